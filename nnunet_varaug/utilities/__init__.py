"""utilities (docstring written below)."""
