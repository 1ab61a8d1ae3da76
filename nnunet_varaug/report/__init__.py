"""report (docstring written below)."""
