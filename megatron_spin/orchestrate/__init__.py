"""Ray placement of trainer ranks and rollout engines; building a run from its config."""
