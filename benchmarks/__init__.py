"""Benchmarks: normsurgeon against what users have today. Run ``python -m benchmarks.run``."""
