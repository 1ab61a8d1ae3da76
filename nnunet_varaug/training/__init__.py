"""training (docstring written below)."""
