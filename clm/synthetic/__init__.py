"""Procedural scenes rendered by ray casting, written in COLMAP layout for tests, demos and benchmarks."""
