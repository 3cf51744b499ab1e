"""Every MoE op on every backend present (torch, cpu, emu, cuda) against its PyTorch reference,
and the references themselves against brute-force loops written from the op docstrings.

Awkward sizes: T in {1, 2, 7, 16, 17, 129, 257}; k in {0, 1, 2, 6, 8, E}; experts with no
tokens; every token to one expert; masks; renormalise on and off; NaN/Inf rows; padded strides.
Data movement (ids, align) is compared bit for bit; numerics use tests/tolerances.py.

emu runs the CUDA kernels on the CPU (csrc/emu): it proves the kernels' indexing, barriers and
fragment layouts, not their timing, occupancy or behaviour under weak memory ordering.
"""
import math

import pytest
import torch

from moe_engine.ops import align, align_ref, available_backends, combine, combine_ref, expert_ffn, route, route_ref
from moe_engine.ops.align import capacity

from tolerances import assert_close

BACKENDS = [b for b in available_backends() if b != "cuda"]
DEV = "cpu"


# ---- route ---------------------------------------------------------------------------------

def brute_route(logits, k, mask=None, mode="reroute", force=-1, renorm=False):
    """Row by row, straight from the docstring of src/moe_engine/ops/route.py."""
    ids, wts = [], []
    for row in logits.float().tolist():
        x = [(-math.inf if math.isnan(v) else v) for v in row]
        if any(v == math.inf for v in x):
            n = sum(v == math.inf for v in x)
            p = [1.0 / n if v == math.inf else 0.0 for v in x]
        elif all(v == -math.inf for v in x):
            p = [0.0] * len(x)
        else:
            m = max(x)
            ex = [math.exp(v - m) for v in x]
            s = sum(ex)
            p = [e / s for e in ex]
        cand = [e for e in range(len(x)) if not (mode == "reroute" and mask is not None and mask[e])]
        cand.sort(key=lambda e: (-p[e], e))
        if force >= 0:
            cand = [force] + [e for e in cand if e != force]
        chosen = cand[:k]
        w = [0.0 if (mode == "zero" and mask is not None and mask[e]) else p[e] for e in chosen]
        if renorm and sum(w) > 0:
            w = [v / sum(w) for v in w]
        ids.append(chosen)
        wts.append(w)
    return ids, wts


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (7, 8, 8), (17, 64, 6), (129, 64, 1), (16, 64, 0), (2, 64, 64)])
def test_route_ref_matches_brute_force(T, E, k):
    logits = torch.randn(T, E)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[[1, 3]] = True
    for kw in (dict(), dict(mask=mask, mode="reroute"), dict(mask=mask, mode="zero"), dict(renorm=True),
               dict(force=5)):
        if kw.get("mode") == "reroute" and k > E - 2 or (kw.get("force", -1) >= 0 and k == 0):
            continue
        ids, w, _ = route_ref(logits, k, k_max=max(k, 1), expert_mask=kw.get("mask"),
                              mask_mode=kw.get("mode", "reroute"), force_expert=kw.get("force", -1),
                              renormalize=kw.get("renorm", False))
        bids, bw = brute_route(logits, k, **kw)
        assert ids[:, :k].tolist() == bids, kw
        torch.testing.assert_close(w[:, :k], torch.tensor(bw).reshape(T, k), atol=1e-6, rtol=1e-5)
        assert (ids[:, k:] == -1).all() and (w[:, k:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 129, 257])
@pytest.mark.parametrize("E,k", [(8, 0), (8, 1), (8, 2), (64, 6), (64, 8), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_backend_matches_reference(backend, T, E, k, dtype):
    g = torch.Generator().manual_seed(T * 1000 + E + k)
    # distinct values per row, so ties cannot make two correct answers differ
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    k_max = max(1, min(k + 1, E))  # slots past k must come back as sentinels
    for kw in (dict(), dict(renormalize=True),
               dict(expert_mask=torch.arange(E) % 3 == 0, mask_mode="zero"),
               dict(expert_mask=torch.arange(E) < 2, mask_mode="reroute"),
               dict(force_expert=E - 1)):
        if "force_expert" in kw and k == 0 or kw.get("mask_mode") == "reroute" and k > E - 2:
            continue
        usage = torch.zeros(E, dtype=torch.int32)
        ids, w, probs = route(logits, k, k_max=k_max, backend=backend, want_probs=True, usage_counts=usage, **kw)
        rids, rw, rprobs = route_ref(logits, k, k_max=k_max, **kw)
        case = f"{backend} T={T} E={E} k={k} {dtype} {kw}"
        assert torch.equal(ids, rids), case
        assert_close(w, rw, "route_weights", torch.float32, case)
        assert_close(probs, rprobs, "route_weights", torch.float32, case)
        assert int(usage.sum()) == T * k, case
        assert torch.equal(usage, torch.bincount(rids[rids >= 0].long(), minlength=E).int()), case


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_nonfinite_and_strides(backend):
    E = 8
    logits = torch.tensor([
        [0.0] * E,                                           # all tie -> ids 0, 1, 2
        [1.0, 2.0, 2.0, 0.0, 2.0, 0.0, 0.0, 0.0],            # tie at the top -> 1, 2, 4
        [float("nan")] * E,                                  # no finite mass -> zeros, ids 0, 1, 2
        [float("nan"), 1.0, float("inf"), 0, 0, float("inf"), 0, 0],  # +inf share the mass
        [-float("inf")] * (E - 1) + [0.0],
    ])
    padded = torch.zeros(5, 16)
    padded[:, :E] = logits
    strided = padded[:, :E]   # row stride 16: must be honoured
    for x in (logits, strided):
        ids, w, _ = route(x, 3, backend=backend)
        assert ids.tolist() == [[0, 1, 2], [1, 2, 4], [0, 1, 2], [2, 5, 0], [7, 0, 1]]
        assert torch.allclose(w[2], torch.zeros(3)) and torch.allclose(w[3], torch.tensor([0.5, 0.5, 0.0]))
        for row in ids.tolist():
            assert len(set(row)) == len(row)


def per_row_controls(T, E, k, seed, mode):
    """A random [T, E] mask (each row leaves >= k experts under reroute, >= 1 always) and [T]
    forced ids (-1 on about half the rows, never a masked expert), as the dispatcher requires."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, E, generator=g) < 0.4
    keep = max(k, 1) if mode == "reroute" else 1
    for t in range(T):
        free = torch.randperm(E, generator=g)[:keep]
        mask[t, free] = False
    force = torch.randint(0, E, (T,), generator=g, dtype=torch.int32)
    force[torch.rand(T, generator=g) < 0.5] = -1
    if k == 0:
        force[:] = -1
    clash = (force >= 0) & mask.gather(1, force.clamp_min(0).long().unsqueeze(1)).squeeze(1)
    force[clash] = -1
    return mask, force


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (7, 8, 8), (17, 64, 6), (129, 64, 1), (16, 64, 0), (33, 64, 64)])
@pytest.mark.parametrize("mode", ["reroute", "zero"])
def test_route_ref_per_token_controls_match_brute_force(T, E, k, mode):
    """A [T, E] mask and [T] forced ids: row t is routed as brute_route routes it alone."""
    if mode == "reroute" and k == E:
        k = E - 1 if T > 1 else k
    mask, force = per_row_controls(T, E, k, T * 31 + E + k, mode)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(T + k))
    for renorm in (False, True):
        ids, w, _ = route_ref(logits, k, k_max=max(k, 1), expert_mask=mask, mask_mode=mode,
                              force_expert=force, renormalize=renorm)
        for t in range(T):
            bids, bw = brute_route(logits[t:t + 1], k, mask=mask[t].tolist(), mode=mode,
                                   force=int(force[t]), renorm=renorm)
            assert ids[t, :k].tolist() == bids[0], (t, renorm)
            torch.testing.assert_close(w[t, :k], torch.tensor(bw[0]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7, 17, 129])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 3), (64, 6), (64, 8), (40, 5)])
@pytest.mark.parametrize("mode", ["reroute", "zero"])
def test_route_per_token_controls_match_reference(backend, T, E, k, mode):
    """Per-token masks ([T, E], row stride E or a padded stride) and forced ids ([T]) on every
    backend against route_ref; also a [T, E] mask whose rows are all equal gives the bits of the
    broadcast [E] mask (stride 0). emu runs route.cu on the CPU: it shows the per-row indexing,
    not GPU timing or memory ordering (no inter-thread communication is added)."""
    g = torch.Generator().manual_seed(T * 7 + E + k)
    mask, force = per_row_controls(T, E, k, T * 13 + E + k, mode)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
        padded = torch.zeros(T, E + 5, dtype=torch.bool)
        padded[:, :E] = mask
        for m in (mask, padded[:, :E]):
            usage = torch.zeros(E, dtype=torch.int32)
            kw = dict(expert_mask=m, mask_mode=mode, force_expert=force, renormalize=k % 2 == 1)
            ids, w, probs = route(logits, k, k_max=k + 1, backend=backend, want_probs=True, usage_counts=usage, **kw)
            rids, rw, rprobs = route_ref(logits, k, k_max=k + 1, **kw)
            case = f"{backend} T={T} E={E} k={k} {mode} {dtype} stride={m.stride()}"
            assert torch.equal(ids, rids), case
            assert_close(w, rw, "route_weights", torch.float32, case)
            assert_close(probs, rprobs, "route_weights", torch.float32, case)
            assert torch.equal(usage, torch.bincount(rids[rids >= 0].long(), minlength=E).int()), case
        row = mask[0]
        a = route(logits, k, expert_mask=row, mask_mode=mode, backend=backend)
        b = route(logits, k, expert_mask=row.expand(T, E).contiguous(), mask_mode=mode, backend=backend)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), f"{backend} broadcast vs rows"


def test_route_refuses_bad_per_token_controls():
    """A row that removes every expert is an error naming the row; wrong shapes name the shape."""
    x = torch.randn(5, 8)
    mask = torch.zeros(5, 8, dtype=torch.bool)
    mask[3] = True
    with pytest.raises(ValueError, match="token 3 removes every one of the 8 experts"):
        route(x, 1, expert_mask=mask, backend="torch")
    mask[3] = False
    mask[2, 1:] = True
    with pytest.raises(ValueError, match="token 2 leaves only 1 experts"):
        route(x, 2, expert_mask=mask, backend="torch")
    with pytest.raises(ValueError, match=r"shape \[6, 8\]"):
        route(x, 1, expert_mask=torch.zeros(6, 8, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match=r"force_expert has shape \[4\]"):
        route(x, 1, force_expert=torch.zeros(4, dtype=torch.int32), backend="torch")
    force = torch.tensor([-1, -1, -1, -1, 0], dtype=torch.int32)
    with pytest.raises(ValueError, match="token 4 = 0 is also masked"):
        route(x, 1, expert_mask=torch.ones(8, dtype=torch.bool).index_fill(0, torch.tensor([5]), False),
              force_expert=force, backend="torch")
    with pytest.raises(ValueError, match="token 1 = 9"):
        route(x, 1, force_expert=torch.tensor([0, 9, 0, 0, 0], dtype=torch.int32), backend="torch")


def test_route_refuses_bad_arguments():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="topk = 9"):
        route(x, 9, backend="torch")
    with pytest.raises(ValueError, match="removes every one"):
        route(x, 1, expert_mask=torch.ones(8, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="dtype"):
        route(x.half(), 1, backend="torch")
    with pytest.raises(ValueError, match="unit stride"):
        route(torch.randn(8, 3).t(), 1, backend="torch")


# ---- align ---------------------------------------------------------------------------------

def _ids_cases(T, k, E, g):
    yield "random", torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    yield "one expert", torch.where(torch.arange(k) == 0, 3, -1).int().expand(T, k).contiguous()
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    ids[:, k // 2:] = -1  # sentinels (unused slots)
    ids[0, 0] = E + 5     # out of range: skipped too
    yield "sentinels", ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 129, 257])
@pytest.mark.parametrize("k,E,block_m", [(1, 8, 16), (2, 8, 1), (6, 64, 16), (8, 64, 64), (8, 8, 8)])
def test_align_bitwise(backend, T, k, E, block_m):
    g = torch.Generator().manual_seed(T * 7 + k)
    for name, ids in _ids_cases(T, k, E, g):
        a, r = align(ids, E, block_m, backend=backend), align_ref(ids, E, block_m)
        case = f"{backend} T={T} k={k} E={E} bm={block_m} {name}"
        for f in ("expert_counts", "expert_offsets", "sorted_slots", "tile_experts", "num_padded"):
            got, want = getattr(a, f), getattr(r, f)
            n = int(r.num_padded) if f == "sorted_slots" else (int(r.num_padded) // block_m if f == "tile_experts" else None)
            assert torch.equal(got[:n], want[:n]), f"{case}: {f}"
        # invariants of the reference itself
        flat = ids.reshape(-1)
        valid = ((flat >= 0) & (flat < E)).nonzero().squeeze(1)
        s = r.sorted_slots[: int(r.num_padded)]
        assert sorted(s[s >= 0].tolist()) == valid.tolist(), case  # every slot exactly once
        assert r.sorted_slots.numel() == capacity(T, k, E, block_m)
        for e in range(E):
            seg = r.sorted_slots[r.expert_offsets[e]: r.expert_offsets[e + 1]]
            seg = seg[seg >= 0]
            assert (flat[seg.long()] == e).all() and (seg.diff() > 0).all(), case


# ---- combine -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,k,D", [(1, 1, 8), (7, 6, 64), (17, 8, 40), (129, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_shared,with_residual", [(True, True), (False, False), (True, False)])
def test_combine_matches_reference(backend, T, k, D, dtype, with_shared, with_residual):
    eo = (torch.randn(T, k, D) / 10).to(dtype)
    ids = torch.randint(0, 8, (T, k), dtype=torch.int32)
    ids[:, -1] = -1  # a sentinel slot: its (garbage) row must be ignored
    eo[:, -1] = float("nan")
    w = torch.rand(T, k)
    sh = (torch.randn(T, D) / 10).to(dtype) if with_shared else None
    res = torch.randn(T, D).to(dtype) if with_residual else None
    out, routed = combine(eo, w, ids, sh, res, backend=backend, want_routed=True)
    rout, rrouted = combine_ref(eo, w, ids, sh, res)
    case = f"{backend} T={T} k={k} D={D}"
    assert_close(out, rout, "combine", dtype, case)
    assert_close(routed, rrouted, "combine", dtype, case)
    # the reference against the formula
    valid = (ids >= 0).unsqueeze(-1)
    want = torch.where(valid, w.unsqueeze(-1) * eo.float(), 0).sum(1)
    assert_close(rrouted, want.to(dtype), "combine", dtype, "ref vs formula")


# ---- expert_ffn ----------------------------------------------------------------------------

def brute_ffn(x, ids, gu, dn):
    T, k = ids.shape
    out = torch.zeros(T, k, x.shape[1], dtype=torch.float64)
    F = gu.shape[1] // 2
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < gu.shape[0]:
                h = gu[e].double() @ x[t].double()
                out[t, j] = dn[e].double() @ (torch.nn.functional.silu(h[:F]) * h[F:])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 129])
@pytest.mark.parametrize("k,E", [(1, 8), (2, 8), (6, 16), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_matches_reference(backend, T, k, E, dtype):
    if backend == "emu" and dtype == torch.float32:
        pytest.skip("the CUDA kernels are bf16-only")
    D, F = 64, 48
    g = torch.Generator().manual_seed(T + 10 * k)
    x = (torch.randn(T, D, generator=g) / 10).to(dtype)
    gu = (torch.randn(E, 2 * F, D, generator=g) / 10).to(dtype)
    dn = (torch.randn(E, D, F, generator=g) / 10).to(dtype)
    for name, ids in _ids_cases(T, k, E, g):
        ids = ids.clamp(max=E - 1) if name != "sentinels" else torch.where(ids >= E, -1, ids)
        got = expert_ffn(x, ids, gu, dn, backend=backend)
        want = brute_ffn(x, ids, gu, dn)
        valid = (ids >= 0).unsqueeze(-1).expand_as(got)
        case = f"{backend} T={T} k={k} E={E} {name}"
        assert_close(got[valid], want[valid].to(dtype), "expert_ffn", dtype, case)
