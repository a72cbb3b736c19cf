"""Attention workloads: synthetic inputs with controlled norms, and q/k/v captured from real models."""
from .qkv import QKV
from .synthetic import gaussian

__all__ = ["QKV", "gaussian"]
