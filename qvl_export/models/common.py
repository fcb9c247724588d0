"""Building blocks shared by the export-ready modules.

Written for tracing: no data-dependent Python control flow, no ``.tolist()``, no in-place index
writes. Norms and rotary math run in float32 whatever the weight dtype.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] rotated by cos/sin broadcastable to x, computed in float32."""
    dtype = x.dtype
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dtype)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": nn.functional.silu,
    "quick_gelu": quick_gelu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


def activation(name: str):
    from qvl_export.core.errors import QvlError

    if name not in ACTIVATIONS:
        raise QvlError(f"Activation '{name}' is not supported; expected one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with scores in float32.

    q [..., Tq, d], k/v [..., Tk, d], allowed bool broadcastable to [..., Tq, Tk]. Disallowed scores
    take the float32 minimum (finite), so a fully masked row (a padding query) stays finite.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)
