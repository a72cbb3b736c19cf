"""Attention workloads: synthetic inputs with controlled norms, and q/k/v captured from real models."""
from .qkv import QKV
from .synthetic import gaussian
from .capture import Captured, capture
from .minilm import minilm, minilm_head
from .passages import passage_count, passages

__all__ = ["QKV", "gaussian", "Captured", "capture", "minilm", "minilm_head", "passages", "passage_count"]
