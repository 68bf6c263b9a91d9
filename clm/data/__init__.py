"""Scenes: camera models, COLMAP and transforms.json readers, image decoding and caching."""
