"""evaluation (docstring written below)."""
