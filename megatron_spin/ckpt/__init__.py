"""Checkpoints: what makes a checkpoint directory, model weights at any layout, run checkpoints, atomic publishing."""
