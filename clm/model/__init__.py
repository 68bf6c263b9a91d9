"""Gaussian models: the attribute spec, initialisation, and the PLY format."""
