"""Engines: where Gaussians live and how one optimiser step runs (resident, naive, clm)."""
