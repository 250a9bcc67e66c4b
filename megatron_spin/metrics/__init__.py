"""Run metrics: one record per step to every configured backend (console, JSONL, TensorBoard, wandb)."""
