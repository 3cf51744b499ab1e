"""rms_norm: the model's RMSNorm, one definition for every path.

Shapes: x [..., D], w [D].

    out = w * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)

The statistics are fp32; the normalised x is rounded to x's dtype BEFORE the multiply by w (as
the checkpoints' remote code does). Kernel: rms_norm_cpu in csrc/cpu/attention_decode.cpp (the
cpu backend's few-token path, src/moe_engine/cpu_weights.py). Test: tests/test_ops.py.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
