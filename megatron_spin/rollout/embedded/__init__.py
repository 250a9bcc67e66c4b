"""The embedded rollout engine: SGLang's HTTP API served over HF transformers on the CPU."""
