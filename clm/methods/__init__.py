"""Splatting methods: what a variant is (:mod:`.base`), the built-in ones, and the registry."""
