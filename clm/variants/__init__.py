"""Splatting variants built on clm's engine: examples of offloading your own attributes."""
