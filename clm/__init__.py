"""clm: 3D Gaussian Splatting training for scenes larger than GPU memory."""

__version__ = "0.1.0"
