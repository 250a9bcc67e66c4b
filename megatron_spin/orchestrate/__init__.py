"""Ray placement of trainer ranks, rollout engines and reward workers; the trainer rank itself."""
