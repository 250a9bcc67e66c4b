"""Typed configuration records, validated at construction (Hydra registration comes with the trainer)."""
