"""Procedural scenes, ray cast and written in COLMAP layout, for tests, demos and benchmarks."""
