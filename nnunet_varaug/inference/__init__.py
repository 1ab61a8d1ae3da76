"""inference (docstring written below)."""
