"""Benchmarks: scripts that print their figures (run with ``python -m``)."""

__all__: list[str] = []
