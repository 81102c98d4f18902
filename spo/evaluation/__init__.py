"""Scoring and comparing models: scorers behind one interface (`scorers.py`)."""
