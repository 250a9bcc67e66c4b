"""Checkpoints: Megatron distributed checkpoints (model weights, later optimizer and run state)."""
