"""Scoring and comparing models: the scorer registry (`scorers/`), bootstrap statistics and the
comparison report. The `spo compare` recipe itself is `spo/commands/compare.py`."""
