"""Shared helpers (placeholder until the data refactor lands)."""
import torch


def lognormalize(x, target_sum: float = 1e4):
    """log1p(x / library_size * 1e4): the encoders' input (and the evaluation scale)."""
    return torch.log1p(x / x.sum(-1, keepdim=True).clamp(min=1.0) * target_sum)
