"""Command-line entry points: clm-train, clm-render, clm-eval, clm-export, clm-synth."""
