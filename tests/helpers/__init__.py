"""Test-only helpers: dummy datasets and bad-input makers (see data.py)."""
