"""fastimagenet: a data-pipeline-centric ResNet trainer with pluggable loader backends."""

__version__ = "0.1.0"
