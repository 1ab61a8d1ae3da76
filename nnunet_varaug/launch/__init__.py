"""launch (docstring written below)."""
