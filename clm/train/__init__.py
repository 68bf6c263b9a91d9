"""The training loop and what it drives: losses, density control, checkpoints."""
