"""The step-aware preference model (SPM); filled by a later issue."""
