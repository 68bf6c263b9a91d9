"""CUDA and C sources compiled at run time (shipped in the wheel as clm.kernels)."""
