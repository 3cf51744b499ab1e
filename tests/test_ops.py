"""Every MoE op on every backend present (torch, cpu, emu, cuda) against its PyTorch reference,
the references themselves against brute-force loops written from the op docstrings, and the
cpu-only kernels (packed linear, attention decode) and guarantees (thread counts, the ISA build
under test).

Awkward sizes: T in {1, 2, 7, 16, 17, 129, 257}; k in {0, 1, 2, 6, 8, E}; experts with no
tokens; every token to one expert; masks; renormalise on and off; NaN/Inf rows; padded strides.
Data movement (ids, align) is compared bit for bit; numerics use tests/tolerances.py.

emu runs the CUDA kernels on the CPU (csrc/emu): it proves the kernels' indexing, barriers and
fragment layouts, not their timing, occupancy or behaviour under weak memory ordering.

Every test id names its backend, or says cpu for a cpu-only test: tools/test_cpu_isas.sh selects
the cpu cases with `-k cpu`, CI's emu order stage the emu cases with `-k emu`.
"""
import contextlib
import math
import os

import pytest
import torch

from moe_engine.ops import (align, align_ref, available_backends, combine, combine_ref, expert_ffn, expert_ffn_ref,
                            route, route_ref)
from moe_engine.ops.align import capacity
from moe_engine.ops.attention import attention_decode_cpu
from moe_engine.ops.backend import native_module
from moe_engine.ops.expert_ffn import CpuExperts
from moe_engine.ops.packed import linear_cpu, pack_weight

from tolerances import assert_close

BACKENDS = available_backends()
TS = (1, 2, 7, 16, 17, 129, 257)
# The emulator runs one CUDA thread at a time, and CI runs its cases in three thread orders: the
# largest sizes, which take no other kernel path than the next smaller ones, run on the other
# backends only.
EMU_LARGEST = "the emulator is slow and this size takes the same kernel path as a smaller one"


def on(backend, t):
    """`t` on the backend's device: cuda tensors for cuda, else as it is (None stays None)."""
    return t.to("cuda") if backend == "cuda" and isinstance(t, torch.Tensor) else t


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # torch and _C share one OpenMP runtime (libgomp.so.1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_loaded_cpu_build_is_the_expected_isa():
    """tools/test_cpu_isas.sh runs the cpu cases once per ISA build of _C (MOE_ENGINE_CPU_MODULE=<.so>,
    MOE_ENGINE_EXPECT_CPU_ISA=<its simd.h build>): a run must test the build it names."""
    want = os.environ.get("MOE_ENGINE_EXPECT_CPU_ISA")
    if not want:
        pytest.skip("MOE_ENGINE_EXPECT_CPU_ISA is not set (tools/test_cpu_isas.sh sets it)")
    mod = native_module("cpu")
    assert mod.cpu_isa == want, f"{mod.__file__} is the {mod.cpu_isa!r} build, expected {want!r}"
    if path := os.environ.get("MOE_ENGINE_CPU_MODULE"):
        assert os.path.samefile(mod.__file__, path), f"loaded {mod.__file__}, not {path}"


def random_ids(T, k, E, g=None):
    """[T, k] int32, distinct ids per row."""
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int().reshape(T, k)


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
        assert_close(w[:, :k], torch.tensor(bw).reshape(T, k), "route_weights", torch.float32, str(kw))
        assert (ids[:, k:] == -1).all() and (w[:, k:] == 0).all()


def check_route(backend, logits, k, case, **kw):
    """route on `backend` against route_ref: ids bit for bit, weights and router_probs to the
    table, usage counts equal to the chosen ids' histogram. Returns (ids, weights) on the CPU."""
    usage = on(backend, torch.zeros(logits.shape[1], dtype=torch.int32))
    ids, w, probs = route(on(backend, logits), k, backend=backend, want_probs=True, usage_counts=usage,
                          **{a: on(backend, b) for a, b in kw.items()})
    ids, w, probs, usage = ids.cpu(), w.cpu(), probs.cpu(), usage.cpu()
    rids, rw, rprobs = route_ref(logits, k, **kw)
    case = f"{backend} {case} {kw}"
    assert torch.equal(ids, rids), f"route ids [{case}]"
    assert_close(w, rw, "route_weights", torch.float32, case)
    assert_close(probs, rprobs, "route_weights", torch.float32, f"router_probs {case}")
    assert torch.equal(usage, torch.bincount(rids[rids >= 0].long(), minlength=logits.shape[1]).int()), case
    return ids, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("E,k", [(8, 0), (8, 1), (8, 2), (64, 6), (64, 8), (8, 8), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(backend, T, E, k, dtype):
    if backend == "emu" and k == E == 64 and T > 17:
        pytest.skip(EMU_LARGEST)
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
        check_route(backend, logits, k, f"T={T} E={E} k={k} {dtype}", k_max=k_max, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ("reroute", "zero"))
@pytest.mark.parametrize("renorm", (False, True))
def test_route_mask_and_force(backend, mode, renorm):
    E = 64
    logits = torch.randn(17, E) * 2
    mask = torch.zeros(E, dtype=torch.bool)
    mask[logits[0].argsort(descending=True)[:3]] = True  # mask row 0's favourites
    mask[[5, 40]] = True
    check_route(backend, logits, 6, "T=17", expert_mask=mask, mask_mode=mode, renormalize=renorm)
    force = int((~mask).nonzero()[-1])  # an unmasked, likely low-probability expert
    check_route(backend, logits, 6, "T=17", expert_mask=mask, mask_mode=mode, renormalize=renorm,
                force_expert=force)


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
        ids, w = check_route(backend, x, 3, f"stride {x.stride(0)}")
        assert ids.tolist() == [[0, 1, 2], [1, 2, 4], [0, 1, 2], [2, 5, 0], [7, 0, 1]]
        assert torch.equal(w[2], torch.zeros(3)) and torch.equal(w[3], torch.tensor([0.5, 0.5, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_nonfinite_rows_at_a_wide_stride(backend):
    E = 64
    wide = torch.randn(9, E + 5) * 2
    logits = wide[:, :E]  # padded row stride E + 5
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[2, :] = 0.0  # a full tie: lowest ids win
    logits[3, [4, 9]] = float("inf")  # two +inf share the mass
    logits[4, ::2] = float("nan")
    logits[5, [3, 30, 31]] = 50.0  # exact ties at the top
    ids, w = check_route(backend, logits, 6, "stride E+5")
    assert ids[0].tolist() == list(range(6)) and w[0].abs().sum() == 0
    assert ids[5, :3].tolist() == [3, 30, 31]
    for row in ids.tolist():
        assert len(set(row)) == len(row), f"duplicate id in {row}"


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
    yield "random", random_ids(T, k, E, g)
    yield "one expert", torch.where(torch.arange(k) == 0, 3, -1).int().expand(T, k).contiguous()
    ids = random_ids(T, k, E, g)
    ids[:, k // 2:] = -1  # sentinels (unused slots)
    if k:
        ids[0, 0] = E + 5  # out of range: skipped too
    yield "sentinels", ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("k,E,block_m", [(1, 8, 16), (2, 8, 1), (6, 64, 16), (8, 64, 64), (8, 8, 8), (6, 64, 1)])
def test_align_bitwise(backend, T, k, E, block_m):
    g = torch.Generator().manual_seed(T * 7 + k)
    for name, ids in _ids_cases(T, k, E, g):
        a, r = align(on(backend, ids), E, block_m, backend=backend), align_ref(ids, E, block_m)
        case = f"{backend} T={T} k={k} E={E} bm={block_m} {name}"
        # every entry, also the -1 padding past num_padded (align.py's contract)
        for f in ("expert_counts", "expert_offsets", "sorted_slots", "tile_experts", "num_padded"):
            assert torch.equal(getattr(a, f).cpu(), getattr(r, f)), f"{case}: {f}"
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
@pytest.mark.parametrize("T,k,D", [(1, 1, 8), (7, 6, 64), (17, 8, 40), (129, 2, 64), (257, 8, 136)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_reference(backend, T, k, D, dtype):
    if backend == "emu" and T == 257:
        pytest.skip(EMU_LARGEST)
    eo = (torch.randn(T, k, D) / 10).to(dtype)
    ids = torch.randint(0, 8, (T, k), dtype=torch.int32)
    ids[:, -1] = -1  # a sentinel slot: its (garbage) row must be ignored
    eo[:, -1] = float("nan")
    w = torch.rand(T, k)
    sh = (torch.randn(T, D) / 10).to(dtype)
    res = torch.randn(T, D).to(dtype)
    for s, r in ((sh, res), (None, res), (sh, None), (None, None)):
        out, routed = combine(on(backend, eo), on(backend, w), on(backend, ids), on(backend, s), on(backend, r),
                              backend=backend, want_routed=True)
        rout, rrouted = combine_ref(eo, w, ids, s, r)
        case = f"{backend} T={T} k={k} D={D} shared={s is not None} residual={r is not None}"
        assert_close(out.cpu(), rout, "combine", dtype, case)
        assert_close(routed.cpu(), rrouted, "combine", dtype, case)
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


def ffn_inputs(T, k, E, D, F, dtype, g):
    """x, gate_up, down ~N(0, 0.1) as the tolerance table assumes; the id cases of _ids_cases
    with every out-of-range id turned into a sentinel (expert_ffn takes ids < E)."""
    x = (torch.randn(T, D, generator=g) / 10).to(dtype)
    gu = (torch.randn(E, 2 * F, D, generator=g) / 10).to(dtype)
    dn = (torch.randn(E, D, F, generator=g) / 10).to(dtype)
    cases = [(name, torch.where(ids >= E, -1, ids)) for name, ids in _ids_cases(T, k, E, g)]
    return x, gu, dn, cases


@pytest.mark.parametrize("T,k,E", [(1, 2, 8), (7, 6, 16), (17, 8, 8), (16, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_ref_matches_brute_force(T, k, E, dtype):
    x, gu, dn, cases = ffn_inputs(T, k, E, 64, 48, dtype, torch.Generator().manual_seed(T + 10 * k))
    for name, ids in cases:
        got, want = expert_ffn_ref(x, ids, gu, dn), brute_ffn(x, ids, gu, dn)
        assert torch.all(got[ids < 0] == 0), "sentinel slots must come back as zero rows"
        assert_close(got[ids >= 0], want[ids >= 0].to(dtype), "expert_ffn", dtype, f"ref T={T} k={k} {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])  # torch is expert_ffn_ref
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("k,E", [(0, 8), (1, 8), (2, 8), (6, 16), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_ffn_matches_reference(backend, T, k, E, dtype):
    if backend in ("emu", "cuda") and dtype == torch.float32:
        pytest.skip("the CUDA kernels are bf16-only")
    if backend in ("emu", "cuda") and k == 0:
        pytest.skip("the CUDA launchers take k_max >= 1 and raise otherwise")
    if backend == "emu" and T == 257:
        pytest.skip(EMU_LARGEST)
    D, F = 64, 48
    x, gu, dn, cases = ffn_inputs(T, k, E, D, F, dtype, torch.Generator().manual_seed(T + 10 * k))
    for name, ids in cases:
        got = expert_ffn(on(backend, x), on(backend, ids), on(backend, gu), on(backend, dn), backend=backend).cpu()
        want = expert_ffn_ref(x, ids, gu, dn)
        case = f"{backend} T={T} k={k} E={E} {name}"
        assert torch.all(got[ids < 0] == 0), f"{case}: sentinel slots must come back as zero rows"
        assert_close(got[ids >= 0], want[ids >= 0], "expert_ffn", dtype, case)


# ---- cpu-only kernels and guarantees -------------------------------------------------------
# The packed layouts, the tiling of csrc/cpu/expert_ffn.cpp and the decode attention kernel
# exist only on the cpu backend; their sizes are chosen for that kernel's edges.

def _cpu_ffn_case(T, k, E, D, F, dtype, skew=None):
    x = (torch.randn(T, D) * 0.1).to(dtype)
    gu = (torch.randn(E, 2 * F, D) * 0.1).to(dtype)
    dn = (torch.randn(E, D, F) * 0.1).to(dtype)
    ids = torch.argsort(torch.rand(T, E), dim=1)[:, :k].int()
    if skew is not None and k > 0:  # slot 0 of every row to expert `skew`
        ids[ids == skew] = ids[:, 0:1].expand_as(ids)[ids == skew]
        ids[:, 0] = skew
    if T > 2 and k > 0:
        ids[1, -1] = -1
    return x, ids, gu, dn


# (40, 2, 4, 2048, 64) and (33, 2, 3, 64, 2048): token / intermediate rows of 4 KiB (bf16) or 8 KiB
# (fp32), which the kernel tiles shorter (kAliasM in csrc/cpu/expert_ffn.cpp)
@pytest.mark.parametrize("shape", [(1, 6, 64, 512, 256), (7, 3, 5, 33, 17), (129, 2, 4, 130, 24),
                                   (257, 6, 64, 64, 32), (17, 4, 4, 512, 1408), (40, 2, 4, 2048, 64),
                                   (33, 2, 3, 64, 2048)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_expert_ffn_cpu_packed_shapes_and_skew(shape, dtype):
    T, k, E, D, F = shape
    for skew in (None, 0):  # skew: every token to expert 0 (the other experts nearly empty)
        x, ids, gu, dn = _cpu_ffn_case(T, k, E, D, F, dtype, skew=skew)
        out = expert_ffn(x, ids, gu, dn, backend="cpu", packed=CpuExperts.pack(gu, dn))
        ref = expert_ffn_ref(x, ids, gu, dn)
        assert_close(out[ids >= 0], ref[ids >= 0], "expert_ffn", dtype, f"{shape} skew={skew}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T,Dout,Din", [(1, 64, 512), (13, 1000, 333), (3, 16384, 64), (13, 100, 2048), (9, 70, 1024)])
def test_linear_cpu(dtype, T, Dout, Din):
    x, w = torch.randn(T, Din).to(dtype), (torch.randn(Dout, Din) / Din ** 0.5).to(dtype)
    ref = (x.float() @ w.float().t()).to(dtype)
    assert_close(linear_cpu(x, pack_weight(w)), ref, "expert_ffn", dtype, f"linear T={T} Dout={Dout} Din={Din}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# 2048: rows of 4/8 KiB, tiled shorter; 33 and 1101: odd Din (a last k without a partner), and
# 1101 > the AVX2 kernel's 1024-k chunks
@pytest.mark.parametrize("Din", (512, 2048, 33, 1101))
def test_cpu_row_does_not_depend_on_its_tile(dtype, Din):
    """Each token row keeps its own accumulators over the same k order, whatever tile it lands
    in: the whole batch and each row alone give the same bits (so batch size, tile height and
    routing never change a token's result)."""
    x, w = torch.randn(29, Din).to(dtype), (torch.randn(40, Din) / Din ** 0.5).to(dtype)
    pw = pack_weight(w)
    whole = linear_cpu(x, pw)
    assert all(torch.equal(whole[i:i + 1], linear_cpu(x[i:i + 1].contiguous(), pw)) for i in range(29))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpu_one_and_two_threads_give_the_same_bits(dtype):
    """The cpu kernels fix each element's summation order, so the thread count never changes a bit."""
    T, k, E, D, F = 129, 6, 64, 96, 40
    x, ids, gu, dn = _cpu_ffn_case(T, k, E, D, F, dtype)
    packed = CpuExperts.pack(gu, dn)
    logits = torch.randn(T, E).to(dtype)
    w = torch.rand(T, k)
    res = torch.randn(T, D).to(dtype)
    lin_w = pack_weight((torch.randn(1000, D) / D ** 0.5).to(dtype))
    runs = []
    for n in (1, 2):
        with threads(n):
            r = route(logits, k, backend="cpu", want_probs=True)
            eo = expert_ffn(x, ids, gu, dn, backend="cpu", packed=packed)
            c = combine(eo, w, ids, None, res, backend="cpu", want_routed=True)
            runs.append((*r, eo, *c, linear_cpu(x, lin_w)))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "1 vs 2 threads differ"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# hd 12 takes the portable loops in every build (AVX2 needs hd % 8 == 0, AVX-512 hd 64/128/256)
@pytest.mark.parametrize("B,H,Hkv,hd,Tkv,Tkv_cap", [(1, 8, 8, 64, 1, 4), (2, 4, 2, 16, 17, 40), (3, 2, 1, 128, 257, 260),
                                               (2, 2, 1, 12, 9, 11)])
def test_attention_decode_cpu_matches_sdpa(dtype, B, H, Hkv, hd, Tkv, Tkv_cap):
    q = torch.randn(B, H, hd).to(dtype)
    kc, vc = torch.randn(B, Hkv, Tkv_cap, hd).to(dtype), torch.randn(B, Hkv, Tkv_cap, hd).to(dtype)
    valid = torch.rand(B, Tkv_cap) > 0.3  # left padding and holes: only valid keys count
    out = attention_decode_cpu(q, kc, vc, valid, Tkv, 1 / math.sqrt(hd))
    mask = valid[:, :Tkv].clone()
    mask[:, Tkv - 1] = True
    keys = kc[:, :, :Tkv].repeat_interleave(H // Hkv, 1).float()
    vals = vc[:, :, :Tkv].repeat_interleave(H // Hkv, 1).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys, vals, attn_mask=mask[:, None, None, :], scale=1 / math.sqrt(hd))
    assert_close(out, ref.squeeze(2).to(dtype), "attention_decode", dtype, f"attention B={B} H={H} Tkv={Tkv}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T,D", [(1, 64), (7, 136), (16, 2048), (3, 1)])
def test_rms_norm_cpu_matches_reference(dtype, T, D):
    """cpu_weights.rms_norm's C++ path (T <= SMALL_N) and its torch fallback (a strided x) against
    ops/norm.py's rms_norm_ref."""
    from moe_engine.cpu_weights import rms_norm
    from moe_engine.ops.norm import rms_norm_ref
    x, w = torch.randn(T, D).to(dtype), (1 + torch.randn(D) / 10).to(dtype)
    want = rms_norm_ref(x, w, 1e-6)
    assert_close(rms_norm(x, w, 1e-6), want, "rms_norm", dtype, f"T={T} D={D}")
    strided = torch.randn(T, 2 * D).to(dtype)[:, ::2]
    assert torch.equal(rms_norm(strided, w, 1e-6), rms_norm_ref(strided, w, 1e-6))
