"""Worked examples that use lumina_hf as a library (not shipped in the wheel). Run from the repository root."""
