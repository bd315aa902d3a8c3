"""Serving simulator: the real scheduler and KV-cache manager driven by a step-time model."""
