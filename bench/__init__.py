"""Benchmarks for SPEC §7 (run with `just bench`)."""
