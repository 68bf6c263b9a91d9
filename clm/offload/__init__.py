"""Offloading: host row store, frustum culling, the GPU row cache and the transfers."""
