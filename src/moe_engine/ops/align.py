"""align: group the (token, slot) pairs by expert for the grouped GEMM.

Shapes: T tokens, k_max slots per token, E experts, block_m tile height,
capacity = round_up(T*k_max + E*(block_m-1), block_m) (the worst case, so buffers can be
allocated once and a decode step captured in a CUDA graph).

    expert_counts[e]  = #{slots s : topk_ids.flat[s] == e}           (ids < 0 or >= E skipped)
    expert_offsets[e] = sum_{e' < e} round_up(expert_counts[e'], block_m); offsets[E] = total
    sorted_slots[expert_offsets[e] + i] = i-th slot of expert e, ascending slot index; -1 pad
    tile_experts[b]   = expert owning tile b, -1 for tiles past num_padded
    num_padded        = expert_offsets[E]

Data movement only: every backend must agree bit for bit.
Kernels: csrc/cuda/align.cu (cuda, emu), csrc/cpu/align.cpp (cpu).
Tests: tests/test_ops.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backend as backends


@dataclass
class Aligned:
    expert_counts: torch.Tensor   # [E] int32
    expert_offsets: torch.Tensor  # [E+1] int32
    sorted_slots: torch.Tensor    # [capacity] int32
    tile_experts: torch.Tensor    # [capacity // block_m] int32
    num_padded: torch.Tensor      # [1] int32
    block_m: int


def capacity(T: int, k_max: int, E: int, block_m: int) -> int:
    n = T * k_max + E * (block_m - 1)
    return (n + block_m - 1) // block_m * block_m


def align_ref(topk_ids: torch.Tensor, E: int, block_m: int) -> Aligned:
    T, k_max = topk_ids.shape
    dev = topk_ids.device
    cap = capacity(T, k_max, E, block_m)
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < E)
    slots = torch.arange(flat.numel(), device=dev)[valid]
    experts = flat[valid]
    counts = torch.bincount(experts, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    # Stable sort by expert keeps ascending slot index within an expert.
    order = torch.sort(experts, stable=True).indices
    sorted_experts, sorted_slot_ids = experts[order], slots[order]
    start = torch.zeros(E, dtype=torch.long, device=dev)
    start[1:] = torch.cumsum(counts, 0)[:-1]
    rank = torch.arange(sorted_experts.numel(), device=dev) - start[sorted_experts]
    sorted_slots = torch.full((cap,), -1, dtype=torch.int32, device=dev)
    sorted_slots[offsets[sorted_experts] + rank] = sorted_slot_ids.int()
    n_tiles = cap // block_m
    tile_experts = torch.full((n_tiles,), -1, dtype=torch.int32, device=dev)
    tiles_per_expert = padded // block_m
    tile_experts[: int(tiles_per_expert.sum())] = torch.repeat_interleave(
        torch.arange(E, device=dev), tiles_per_expert).int()
    return Aligned(counts.int(), offsets.int(), sorted_slots, tile_experts,
                   offsets[E:].int().clone(), block_m)


def align(topk_ids: torch.Tensor, E: int, block_m: int, *, backend: str = "auto") -> Aligned:
    """Checked dispatcher."""
    backends.check(topk_ids, "topk_ids", dtype=torch.int32)
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k_max], got shape {list(topk_ids.shape)}")
    if E <= 0:
        raise ValueError(f"E = {E}; expected at least one expert")
    if block_m <= 0:
        raise ValueError(f"block_m = {block_m}; expected a positive tile height")
    be = backends.resolve(backend, topk_ids.device)
    if be == "torch":
        return align_ref(topk_ids, E, block_m)
    mod = backends.native_module(be)
    T, k_max = topk_ids.shape
    dev = topk_ids.device
    cap = capacity(T, k_max, E, block_m)
    i32 = dict(dtype=torch.int32, device=dev)
    out = Aligned(torch.empty(E, **i32), torch.empty(E + 1, **i32), torch.empty(cap, **i32),
                  torch.empty(cap // block_m, **i32), torch.empty(1, **i32), block_m)
    workspace = torch.empty(mod.align_workspace_size(T, k_max, E), **i32)
    p = mod.AlignParams()
    p.topk_ids = backends.ptr(topk_ids)
    p.T, p.k_max, p.E, p.block_m = T, k_max, E, block_m
    p.expert_counts, p.expert_offsets = backends.ptr(out.expert_counts), backends.ptr(out.expert_offsets)
    p.sorted_slots, p.tile_experts = backends.ptr(out.sorted_slots), backends.ptr(out.tile_experts)
    p.num_padded, p.workspace = backends.ptr(out.num_padded), backends.ptr(workspace)
    if be == "cpu":
        mod.align_cpu(p)
    else:
        mod.align_cuda(p, backends.stream_of(be, dev), backends.device_of(be, dev))
    return out
