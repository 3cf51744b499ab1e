"""The cpu backend's kernels (csrc/cpu) against the PyTorch references beside their dispatchers.

Awkward sizes throughout: T in {1, 2, 7, 16, 17, 129, 257}, k in {0, 1, 2, 6, 8, E}, experts with
no tokens, every token to one expert, masks, renormalise on/off, NaN/Inf rows, padded strides.
align is data movement: compared bit for bit. Tolerances: tests/tolerances.py. Every op also
gives the same bits with 1 and 2 threads (the cpu kernels fix each element's summation order).
"""
import contextlib
import os

import pytest
import torch

from moe_engine.ops import align, align_ref, combine, combine_ref, expert_ffn, expert_ffn_ref, route, route_ref
from moe_engine.ops.backend import native_module
from moe_engine.ops.expert_ffn import CpuExperts
from moe_engine.ops.packed import linear_cpu, pack_weight
from tolerances import TOL, assert_close

TS = (1, 2, 7, 16, 17, 129, 257)
E = 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)  # torch and _C share one OpenMP runtime (libgomp.so.1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_loaded_build_is_the_expected_isa():
    """tools/test_cpu_isas.sh runs this file once per ISA build of _C (MOE_ENGINE_CPU_MODULE=<.so>,
    MOE_ENGINE_EXPECT_CPU_ISA=<its simd.h build>): a run must test the build it names."""
    want = os.environ.get("MOE_ENGINE_EXPECT_CPU_ISA")
    if not want:
        pytest.skip("MOE_ENGINE_EXPECT_CPU_ISA is not set (tools/test_cpu_isas.sh sets it)")
    mod = native_module("cpu")
    assert mod.cpu_isa == want, f"{mod.__file__} is the {mod.cpu_isa!r} build, expected {want!r}"
    if path := os.environ.get("MOE_ENGINE_CPU_MODULE"):
        assert os.path.samefile(mod.__file__, path), f"loaded {mod.__file__}, not {path}"


def random_ids(T, k, E, *, skew=None):
    """[T, k] distinct ids per row (or every slot 0 of each row = `skew`)."""
    ids = torch.argsort(torch.rand(T, E), dim=1)[:, :k].int()
    if skew is not None and k > 0:
        ids[ids == skew] = ids[:, 0:1].expand_as(ids)[ids == skew]
        ids[:, 0] = skew
    return ids


# ---- route -------------------------------------------------------------------------------------
def check_route(logits, k, **kw):
    ids, w, probs = route(logits, k, backend="cpu", want_probs=True, **kw)
    ids_r, w_r, probs_r = route_ref(logits, k, **{a: b for a, b in kw.items() if a != "usage_counts"})
    case = f"T={logits.shape[0]} k={k} {kw}"
    assert torch.equal(ids, ids_r), f"route ids [{case}]"
    atol, rtol = TOL[("route_weights", torch.float32)]
    torch.testing.assert_close(w, w_r, atol=atol, rtol=rtol, msg=lambda m: f"route weights [{case}]: {m}")
    torch.testing.assert_close(probs, probs_r, atol=atol, rtol=rtol, msg=lambda m: f"router_probs [{case}]: {m}")
    return ids, w


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("k", (0, 1, 2, 6, 8, E))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_route_matches_ref(T, k, dtype):
    logits = (torch.randn(T, E) * 2).to(dtype)
    for renorm in (False, True):
        check_route(logits, k, k_max=min(k + 1, E), renormalize=renorm)


@pytest.mark.parametrize("mode", ("reroute", "zero"))
@pytest.mark.parametrize("renorm", (False, True))
def test_route_mask_force(mode, renorm):
    logits = torch.randn(17, E) * 2
    mask = torch.zeros(E, dtype=torch.bool)
    mask[logits[0].argsort(descending=True)[:3]] = True  # mask row 0's favourites
    mask[[5, 40]] = True
    check_route(logits, 6, expert_mask=mask, mask_mode=mode, renormalize=renorm)
    force = int((~mask).nonzero()[-1])  # an unmasked, likely low-probability expert
    check_route(logits, 6, expert_mask=mask, mask_mode=mode, renormalize=renorm, force_expert=force)


def test_route_nonfinite_ties_strides_usage():
    wide = torch.randn(9, E + 5) * 2
    logits = wide[:, :E]  # padded row stride E + 5
    logits[0] = float("nan")
    logits[1] = -float("inf")
    logits[2, :] = 0.0  # a full tie: lowest ids win
    logits[3, [4, 9]] = float("inf")  # two +inf share the mass
    logits[4, ::2] = float("nan")
    logits[5, [3, 30, 31]] = 50.0  # exact ties at the top
    usage = torch.zeros(E, dtype=torch.int32)
    ids, w = check_route(logits, 6, usage_counts=usage)
    assert ids[0].tolist() == list(range(6)) and w[0].abs().sum() == 0
    assert ids[5, :3].tolist() == [3, 30, 31]
    for row in ids.tolist():
        assert len(set(row)) == len(row), f"duplicate id in {row}"
    assert torch.equal(usage, torch.bincount(ids.flatten().long(), minlength=E).int())


# ---- align -------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("k", (1, 6, 8))
@pytest.mark.parametrize("block_m", (1, 16))
def test_align_bitwise(T, k, block_m):
    for skew in (None, 3):
        ids = random_ids(T, k, E, skew=skew)
        ids[::5, -1] = -1  # sentinels are skipped
        a, r = align(ids, E, block_m, backend="cpu"), align_ref(ids, E, block_m)
        for f in ("expert_counts", "expert_offsets", "sorted_slots", "tile_experts", "num_padded"):
            assert torch.equal(getattr(a, f), getattr(r, f)), f"align {f} [T={T} k={k} block_m={block_m} skew={skew}]"


# ---- combine -----------------------------------------------------------------------------------
@pytest.mark.parametrize("T", (1, 7, 17, 257))
@pytest.mark.parametrize("k", (1, 6, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_combine_matches_ref(T, k, dtype):
    D = 136
    eo = torch.randn(T, k, D).to(dtype)
    ids = random_ids(T, k, E)
    ids[::3, -1] = -1
    eo[ids < 0] = float("nan")  # sentinel rows must never be read
    w = torch.rand(T, k)
    sh, res = torch.randn(T, D).to(dtype), torch.randn(T, D).to(dtype)
    for s, r in ((sh, res), (None, res), (sh, None), (None, None)):
        out, routed = combine(eo, w, ids, s, r, backend="cpu", want_routed=True)
        out_r, routed_r = combine_ref(eo, w, ids, s, r)
        assert_close(out, out_r, "combine", dtype, f"T={T} k={k}")
        assert_close(routed, routed_r, "combine", dtype, f"routed T={T} k={k}")


# ---- expert_ffn --------------------------------------------------------------------------------
def ffn_case(T, k, E, D, F, dtype, skew=None):
    # inputs ~N(0, 0.1) as the tolerance table assumes
    x = (torch.randn(T, D) * 0.1).to(dtype)
    gu = (torch.randn(E, 2 * F, D) * 0.1).to(dtype)
    dn = (torch.randn(E, D, F) * 0.1).to(dtype)
    ids = random_ids(T, k, E, skew=skew)
    if T > 2 and k > 0:
        ids[1, -1] = -1
    return x, ids, gu, dn


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("k", (0, 1, 6, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_expert_ffn_matches_ref(T, k, dtype):
    x, ids, gu, dn = ffn_case(T, k, 16, 96, 40, dtype)
    out = expert_ffn(x, ids, gu, dn, backend="cpu")
    ref = expert_ffn_ref(x, ids, gu, dn)
    assert torch.all(out[ids < 0] == 0), "sentinel slots must come back as zero rows"
    assert_close(out[ids >= 0], ref[ids >= 0], "expert_ffn", dtype, f"T={T} k={k}")


# (40, 2, 4, 2048, 64) and (33, 2, 3, 64, 2048): token / intermediate rows of 4 KiB (bf16) or 8 KiB
# (fp32), which the kernel tiles shorter (kAliasM in csrc/cpu/expert_ffn.cpp)
@pytest.mark.parametrize("shape", [(1, 6, 64, 512, 256), (7, 3, 5, 33, 17), (129, 2, 4, 130, 24),
                                   (257, 6, 64, 64, 32), (17, 4, 4, 512, 1408), (40, 2, 4, 2048, 64),
                                   (33, 2, 3, 64, 2048)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_expert_ffn_shapes_and_skew(shape, dtype):
    T, k, E_, D, F = shape
    for skew in (None, 0):  # skew: every token to expert 0 (the other experts nearly empty)
        x, ids, gu, dn = ffn_case(T, k, E_, D, F, dtype, skew=skew)
        packed = CpuExperts.pack(gu, dn)
        out = expert_ffn(x, ids, gu, dn, backend="cpu", packed=packed)
        ref = expert_ffn_ref(x, ids, gu, dn)
        assert_close(out[ids >= 0], ref[ids >= 0], "expert_ffn", dtype, f"{shape} skew={skew}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("T,N,K", [(1, 64, 512), (13, 1000, 333), (3, 16384, 64), (13, 100, 2048), (9, 70, 1024)])
def test_linear_cpu(dtype, T, N, K):
    x, w = torch.randn(T, K).to(dtype), (torch.randn(N, K) / K ** 0.5).to(dtype)
    ref = (x.float() @ w.float().t()).to(dtype)
    assert_close(linear_cpu(x, pack_weight(w)), ref, "expert_ffn", dtype, f"linear T={T} N={N} K={K}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# 2048: rows of 4/8 KiB, tiled shorter; 33 and 1101: odd K (a last k without a partner), and
# 1101 > the AVX2 kernel's 1024-k chunks
@pytest.mark.parametrize("K", (512, 2048, 33, 1101))
def test_a_row_does_not_depend_on_its_tile(dtype, K):
    """Each token row keeps its own accumulators over the same k order, whatever tile it lands
    in: the whole batch and each row alone give the same bits (so batch size, tile height and
    routing never change a token's result)."""
    x, w = torch.randn(29, K).to(dtype), (torch.randn(40, K) / K ** 0.5).to(dtype)
    pw = pack_weight(w)
    whole = linear_cpu(x, pw)
    assert all(torch.equal(whole[i:i + 1], linear_cpu(x[i:i + 1].contiguous(), pw)) for i in range(29))


# ---- thread counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_one_and_two_threads_give_the_same_bits(dtype):
    T, k, D, F = 129, 6, 96, 40
    x, ids, gu, dn = ffn_case(T, k, E, D, F, dtype)
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


# ---- attention_decode --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# hd 12 takes the portable loops in every build (AVX2 needs hd % 8 == 0, AVX-512 hd 64/128/256)
@pytest.mark.parametrize("B,H,Hkv,hd,S,S_cap", [(1, 8, 8, 64, 1, 4), (2, 4, 2, 16, 17, 40), (3, 2, 1, 128, 257, 260),
                                               (2, 2, 1, 12, 9, 11)])
def test_attention_decode_matches_sdpa(dtype, B, H, Hkv, hd, S, S_cap):
    import math

    from moe_engine.ops.attention import attention_decode_cpu
    q = torch.randn(B, H, hd).to(dtype)
    kc, vc = torch.randn(B, Hkv, S_cap, hd).to(dtype), torch.randn(B, Hkv, S_cap, hd).to(dtype)
    valid = torch.rand(B, S_cap) > 0.3  # left padding and holes: only valid keys count
    out = attention_decode_cpu(q, kc, vc, valid, S, 1 / math.sqrt(hd))
    mask = valid[:, :S].clone()
    mask[:, S - 1] = True
    keys = kc[:, :, :S].repeat_interleave(H // Hkv, 1).float()
    vals = vc[:, :, :S].repeat_interleave(H // Hkv, 1).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), keys, vals, attn_mask=mask[:, None, None, :], scale=1 / math.sqrt(hd))
    assert_close(out, ref.squeeze(2).to(dtype), "attention_decode", dtype, f"attention B={B} H={H} S={S}")
