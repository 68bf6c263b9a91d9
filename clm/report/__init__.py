"""Pictures of a run: the training-curve plot, false-colour depth and error maps, videos."""
