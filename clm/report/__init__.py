"""Reports written next to a run: metrics and plots."""
