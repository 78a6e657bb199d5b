"""Dataset tools: scan and verify ImageFolder trees, build the built-in datasets, convert to .beton."""
