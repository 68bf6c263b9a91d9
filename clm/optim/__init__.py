"""Optimisers: dense and lazy sparse Adam, on the GPU and natively on the CPU."""
