"""Megatron-core GPT models from an architecture record: build at any layout, forward, greedy decode."""
