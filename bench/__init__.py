"""Benchmarks of the engine against its performance targets (run with `just bench`)."""
