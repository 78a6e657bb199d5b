"""The base every layer may use: the user-facing errors, whole-or-absent file writes, the ranks' barrier and the
guard for torch's thread count. It imports nothing else of the project (tests/test_layout.py holds the order:
common -> dataset_tools -> loaders -> the rest of fastimagenet)."""
