"""Benchmarks are opt-in: ``pytest bench/ --benchmark-only`` (the default test run collects tests/ only)."""
