"""Renderers: gsplat on CUDA and a pure-torch rasterizer on the CPU, behind one interface."""
