"""megatron_spin: Online DPO / SPIN on Megatron-core with an SGLang rollout fleet."""

__version__ = "0.1.0"
