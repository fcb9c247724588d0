"""The built-in demo model: rendered documents, its training script and the trained checkpoint."""
