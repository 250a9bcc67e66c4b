"""Hydra configs: spin_trainer.yaml (the default run) and presets."""
