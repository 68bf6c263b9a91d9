"""Training presets as TOML files (shipped in the wheel as clm.configs)."""
