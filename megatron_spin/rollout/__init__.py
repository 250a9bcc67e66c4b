"""Rollout: the engine protocol, the HTTP client and fleet, the SGLang launcher and the embedded CPU engine."""
