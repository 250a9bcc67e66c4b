"""Weight sync: actor shards (TP/PP) → HF names via convert/ → buckets → engines by tensor, disk or broadcast."""
