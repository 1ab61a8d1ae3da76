"""commands (docstring written below)."""
