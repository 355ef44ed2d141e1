"""mcpipe: MetaCleaner for noisy-labelled image classification, as a three-stage pipeline."""

__version__ = "0.1.0"
