"""Benchmarks: each figure next to a baseline measured in the same run. Not part of the tests."""
