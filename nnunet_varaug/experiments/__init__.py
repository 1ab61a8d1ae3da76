"""experiments (docstring written below)."""
