"""Benchmarks and parity checks: scripts that print tables and write JSON (not tests)."""
