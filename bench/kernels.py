"""Per-op timings (us, GB/s, GFLOP/s) of the MoE-layer ops on every backend present, each result
checked against the PyTorch reference (tests/tolerances.py) before it is timed.

    python bench/kernels.py                          # bench-small shapes, 2 threads
    python bench/kernels.py --shape 16b --tokens 1,8,64,512 --json
    python bench/kernels.py --device cuda --backends cuda,torch --shape 16b    # on a GPU
    python bench/kernels.py --quant 8,4 --group-size 128      # + the quantized ops (default 8,4)

On cuda every figure is printed beside the HBM floor of its bytes (bench/gpu.py HBM_BYTES_S) and
the fraction of it reached; timings wait for the device.
    python bench/kernels.py --quant 8,4 --group-size 128      # + the quantized ops (default 8,4)

Shapes: T tokens, D hidden, E experts, K top-k, F expert width. GB/s counts the bytes an op
must move at least once (weights of the experts it touches, activations in and out), so it can
be read against the machine's read bandwidth printed on the first line. The quantized ops
(cpu backend, csrc/cpu/quant_gemm.cpp) also print "floor": (bytes / read bandwidth) / time, the
fraction of the read-bandwidth floor reached, with bytes = the quantized panels they stream.
The shared experts print as "shared" (one dense SwiGLU of width S = 2F: csrc/cuda/shared_expert.cu on
cuda / emu, the PyTorch GEMMs on torch) with bytes = their weights plus x and the output.
On the cuda backend (and emu, at T <= 64 only: it is slow) the quantized expert FFN
(csrc/cuda/moe_decode_q.cu for T <= 16, expert_gemm_q.cu above) prints as ffn_q4 / ffn_q8 with
bytes = the qrow rows of the experts the call touches plus activations
(ops.quant.expert_ffn_q_cuda_bytes), so on a GPU its HBM floor fraction shows beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from moe_engine.ops import align, align_ref, available_backends, combine, combine_ref, expert_ffn, expert_ffn_ref
from moe_engine.ops import backend as native
from moe_engine.ops import route, route_ref
from moe_engine.ops.expert_ffn import CpuExperts, shared_expert_cuda, swiglu
from moe_engine.ops.packed import linear_cpu, pack_weight
from moe_engine.ops.quant import dequantize_packed, expert_ffn_q_cpu, linear_q_cpu, pack_quantized
from moe_engine.ops.quant import expert_ffn_q_cuda, expert_ffn_q_cuda_bytes, repack_quantized_cuda
from tolerances import TOL, assert_close  # noqa: E402  (the one tolerance table)

from gpu import hbm_bandwidth, sync_for  # noqa: E402  (bench/gpu.py, beside this file)

SHAPES = {  # name: (D, E, K, F, extra dense mat-vec shapes [Dout x Din] to time)
    "bench-small": (512, 64, 6, 256, [(1536, 512), (512, 512), (16384, 512)]),
    "16b": (2048, 64, 6, 1408, [(6144, 2048), (2048, 2048), (102400, 2048)]),
}
BLOCK_M = 16


SYNC = sync_for("cpu")  # main() sets the device's


def timeit(fn, min_time: float = 0.2, reps: int = 5) -> float:
    """Median seconds per call: `reps` batches, each long enough to be measured (waiting for the
    device after each batch)."""
    fn()
    SYNC()
    t = time.perf_counter()
    fn()
    SYNC()
    one = max(time.perf_counter() - t, 1e-7)
    n = max(1, int(min_time / reps / one))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        SYNC()
        out.append((time.perf_counter() - t) / n)
    return statistics.median(out)


def read_bandwidth() -> float:
    buf = torch.ones(1 << 28, dtype=torch.float32)
    t = timeit(lambda: buf.sum(), min_time=1.0)
    return buf.numel() * 4 / t


class Table:
    def __init__(self, as_json: bool, hbm: float | None = None):
        self.rows, self.as_json, self.hbm = [], as_json, hbm
        if not as_json:
            floor = f" {'HBM floor us':>12} {'of floor':>8}" if hbm else f" {'floor':>6}"
            print(f"{'op':<11} {'shape':<28} {'backend':<7} {'us':>10} {'GB/s':>8} {'GFLOP/s':>8} {'vs torch':>9}{floor}")

    def add(self, op, shape, backend, sec, nbytes, flops=0.0, torch_sec=None, bandwidth=None):
        """bandwidth (bytes/s): also report the fraction of the read-bandwidth floor nbytes / bandwidth."""
        row = dict(op=op, shape=shape, backend=backend, us=sec * 1e6, gb_s=nbytes / sec / 1e9,
                   gflop_s=flops / sec / 1e9 if flops else None,
                   speedup_vs_torch=None if torch_sec is None else torch_sec / sec, bytes=nbytes,
                   floor_fraction=None if bandwidth is None else nbytes / bandwidth / sec)
        if self.hbm:
            row["hbm_floor_us"] = nbytes / self.hbm * 1e6
            row["hbm_floor_fraction"] = row["hbm_floor_us"] / row["us"]
        self.rows.append(row)
        if not self.as_json:
            gf = f"{row['gflop_s']:8.1f}" if flops else f"{'':>8}"
            sp = f"{row['speedup_vs_torch']:8.2f}x" if torch_sec is not None else f"{'':>9}"
            if self.hbm:
                fl = f" {row['hbm_floor_us']:12.1f} {row['hbm_floor_fraction']:8.0%}"
            else:
                fl = f" {row['floor_fraction']:6.0%}" if bandwidth is not None else ""
            print(f"{op:<11} {shape:<28} {backend:<7} {row['us']:10.1f} {row['gb_s']:8.2f} {gf} {sp}{fl}")


def random_gptq(E, Dout, Din, bits, group_size, g):
    """Random GPTQ tensors of E weights [Dout, Din] (every int32 word is a valid set of codes), scales
    sized so the weights are ~0.05 like the bf16 ones above."""
    G = -(-Din // group_size)
    qweight = torch.randint(-(1 << 31), 1 << 31, (E, Din * bits // 32, Dout), generator=g, dtype=torch.int64).int()
    qzeros = torch.randint(-(1 << 31), 1 << 31, (E, G, -(-Dout * bits // 32)), generator=g, dtype=torch.int64).int()
    scales = (torch.rand(E, G, Dout, generator=g) * 0.1 / (1 << (bits - 1))).half()
    return qweight, scales, qzeros


def bench_quant(args, tab, bw, g):
    """The quantized cpu ops: each checked against dequantize-then-matmul, then timed; bytes =
    the quantized panels streamed (all of them for linear_q, the chosen experts' for expert_ffn_q)."""
    D, E, K, F, dense = SHAPES[args.shape]
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    gs = args.group_size
    for bits in [int(b) for b in args.quant.split(",") if b]:
        w13 = pack_quantized(*random_gptq(E, 2 * F, D, bits, gs, g), bits, gs, False, gate_up=True)
        w2 = pack_quantized(*random_gptq(E, D, F, bits, gs, g), bits, gs, False)
        d13, d2 = dequantize_packed(w13), dequantize_packed(w2)
        per_expert = (w13.nbytes + w2.nbytes) // E
        for T in [int(t) for t in args.tokens.split(",")]:
            x = (torch.randn(T, D, generator=g) * 0.1).to(dt)
            ids = route_ref(x @ torch.randn(E, D, generator=g).to(dt).t(), K)[0]
            n_exp = int(torch.unique(ids).numel())
            got = expert_ffn_q_cpu(x, ids, w13, w2)
            assert_close(got, expert_ffn_ref(x.float(), ids, d13, d2).to(dt), "expert_ffn", dt, f"q{bits} T={T}")
            variants = [torch.argsort(torch.rand(E, generator=g))[ids.long()].int() for _ in range(16)]
            it = iter(range(1 << 62))
            t = timeit(lambda: expert_ffn_q_cpu(x, variants[next(it) % 16], w13, w2))
            tab.add(f"ffn_q{bits}", f"T={T} D={D} F={F} ({n_exp} exp) g{gs}", "cpu", t, n_exp * per_expert,
                    2 * T * K * 3 * D * F, bandwidth=bw)
        for N, Kd in dense:
            pw = pack_quantized(*[a[0] for a in random_gptq(1, N, Kd, bits, gs, g)], bits, gs, False)
            wd = dequantize_packed(pw)
            for T in (1, 16, 64):
                x = (torch.randn(T, Kd, generator=g) * 0.1).to(dt)
                assert_close(linear_q_cpu(x, pw), (x.float() @ wd.t()).to(dt), "expert_ffn", dt, f"linear_q{bits}")
                t = timeit(lambda: linear_q_cpu(x, pw))
                tab.add(f"linear_q{bits}", f"T={T} N={N} K={Kd} g{gs}", "cpu", t, pw.nbytes, 2 * T * N * Kd,
                        bandwidth=bw)


def bench_quant_cuda(args, tab, g, backends, dev):
    """The quantized expert FFN on the CUDA kernels (cuda, or emu for T <= 64): GPTQ tensors
    repacked on the device, each result checked against dequantize-then-matmul, then timed;
    bytes = expert_ffn_q_cuda_bytes (qrow rows of the touched experts + activations)."""
    D, E, K, F, _ = SHAPES[args.shape]
    gs = args.group_size
    for be in [b for b in ("cuda", "emu") if b in backends]:
        for bits in [int(b) for b in args.quant.split(",") if b]:
            g13, g2 = random_gptq(E, 2 * F, D, bits, gs, g), random_gptq(E, D, F, bits, gs, g)
            d13 = dequantize_packed(pack_quantized(*g13, bits, gs, False, gate_up=True))
            d2 = dequantize_packed(pack_quantized(*g2, bits, gs, False))
            w13 = repack_quantized_cuda(*[a.to(dev) for a in g13], bits, gs, False, backend=be)
            w2 = repack_quantized_cuda(*[a.to(dev) for a in g2], bits, gs, False, backend=be)
            for T in [int(t) for t in args.tokens.split(",")]:
                if be == "emu" and T > 64:
                    continue
                x = (torch.randn(T, D, generator=g) * 0.1).bfloat16()
                ids = route_ref(x @ torch.randn(E, D, generator=g).bfloat16().t(), K)[0]
                got = expert_ffn_q_cuda(x.to(dev), ids.to(dev), w13, w2, backend=be).cpu()
                assert_close(got, expert_ffn_ref(x.float(), ids, d13, d2).bfloat16(), "expert_ffn", torch.bfloat16,
                             f"{be} q{bits} T={T}")
                variants = [torch.argsort(torch.rand(E, generator=g))[ids.long()].int().to(dev) for _ in range(16)]
                xd, it = x.to(dev), iter(range(1 << 62))
                nbytes = expert_ffn_q_cuda_bytes(T, K, w13, w2, ids)
                t = timeit(lambda: expert_ffn_q_cuda(xd, variants[next(it) % 16], w13, w2, backend=be))
                n_exp = int(torch.unique(ids).numel())
                tab.add(f"ffn_q{bits}", f"T={T} D={D} F={F} ({n_exp} exp) g{gs}", be, t, nbytes, 2 * T * K * 3 * D * F)


def bench(args):
    D, E, K, F, dense = SHAPES[args.shape]
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    el = torch.empty(0, dtype=dt).element_size()
    if args.backends:
        backends = args.backends.split(",")
    else:  # the emu (like the cuda) expert kernels take bf16 only
        backends = [b for b in available_backends() if b != "cuda" and (b != "emu" or args.dtype == "bfloat16")]
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = torch.device(args.device)
    if dev.type == "cuda" and any(b in ("cpu", "emu") for b in backends):
        raise SystemExit(f"error: --device cuda times the cuda and torch backends; got --backends {args.backends}")
    g = torch.Generator().manual_seed(0)
    hbm = hbm_bandwidth(dev)
    tab = Table(args.json, hbm[1] if hbm else None)
    gu = (torch.randn(E, 2 * F, D, generator=g) * 0.05).to(dt).to(dev)  # made on the CPU: one seed, any device
    dn = (torch.randn(E, D, F, generator=g) * 0.05).to(dt).to(dev)
    packed = CpuExperts.pack(gu, dn) if "cpu" in backends else None
    router = (torch.randn(E, D, generator=g) * 2 / D ** 0.5).to(dt).to(dev)
    S = 2 * F  # shared width
    sgu = [(torch.randn(2 * S, D, generator=g) / D ** 0.5).to(dt).to(dev) for _ in range(4 if dev.type == "cuda" else 1)]
    sdn = [(torch.randn(D, S, generator=g) / S ** 0.5).to(dt).to(dev) for _ in range(len(sgu))]

    for T in tokens:
        x = (torch.randn(T, D, generator=g) * 0.1).to(dt).to(dev)
        logits = x @ router.t()
        ids, w, _ = route_ref(logits, K)
        n_exp = int(torch.unique(ids).numel())

        # route
        ref = route_ref(logits, K)
        ts = {}
        for be in backends:
            got = route(logits, K, backend=be)
            assert torch.equal(got[0], ref[0]), f"route {be} T={T}: ids differ from the reference"
            torch.testing.assert_close(got[1], ref[1], atol=TOL[("route_weights", torch.float32)][0],
                                       rtol=TOL[("route_weights", torch.float32)][1])
            ts[be] = timeit(lambda: route(logits, K, backend=be))
            tab.add("route", f"T={T} E={E} K={K}", be, ts[be], T * E * el + T * K * 8, 0,
                    None if be == "torch" else ts.get("torch"))

        # align
        ref_a = align_ref(ids, E, BLOCK_M)
        ts = {}
        for be in backends:
            a = align(ids, E, BLOCK_M, backend=be)
            assert torch.equal(a.sorted_slots, ref_a.sorted_slots), f"align {be} T={T}: differs"
            ts[be] = timeit(lambda: align(ids, E, BLOCK_M, backend=be))
            tab.add("align", f"T={T} K={K} block_m={BLOCK_M}", be, ts[be], T * K * 4 * 3, 0,
                    None if be == "torch" else ts.get("torch"))

        # expert_ffn: the routed experts (weights of the distinct chosen experts, read once)
        ref_e = expert_ffn_ref(x, ids, gu, dn)
        nbytes = n_exp * 3 * D * F * el + T * K * D * el + T * D * el
        flops = 2 * T * K * 3 * D * F
        # timed over rotating routings (same expert count), so few-token calls do not find
        # their experts in the L3 from the previous call
        variants = [torch.argsort(torch.rand(E, generator=g)).to(dev)[ids.long()].int() for _ in range(16)]
        ts = {}
        for be in backends:
            kw = {"packed": packed} if be == "cpu" else {}
            got = expert_ffn(x, ids, gu, dn, backend=be, **kw)
            assert_close(got, ref_e, "expert_ffn", dt, f"{be} T={T}")
            it = iter(range(1 << 62))
            ts[be] = timeit(lambda: expert_ffn(x, variants[next(it) % 16], gu, dn, backend=be, **kw))
            tab.add("expert_ffn", f"T={T} D={D} F={F} ({n_exp} exp)", be, ts[be], nbytes, flops,
                    None if be == "torch" else ts.get("torch"))

        # shared experts: one dense SwiGLU of width S = 2F (DeepSeekMoE's two shared experts),
        # csrc/cuda/shared_expert.cu on cuda / emu (emu at T <= 64 only: it is slow), swiglu on
        # torch; the cpu backend runs it as one packed expert (the expert_ffn row, E = 1). Timed
        # over rotating weight copies, so a GPU cannot serve them from L2 (16b: 4 x 34.6 MB).
        ts = {}
        for be in backends:
            if be == "cpu" or (be == "emu" and T > 64) or (be in ("cuda", "emu") and dt != torch.bfloat16):
                continue
            got = shared_expert_cuda(x, sgu[0], sdn[0], backend=be) if be != "torch" else swiglu(x, sgu[0], sdn[0])
            assert_close(got, swiglu(x, sgu[0], sdn[0]), "expert_ffn", dt, f"shared {be} T={T}")
            it = iter(range(1 << 62))
            if be == "torch":
                fn = lambda: swiglu(x, *(w[next(it) % len(w)] for w in (sgu, sdn)))  # noqa: E731
            else:
                fn = lambda: shared_expert_cuda(x, sgu[(i := next(it) % len(sgu))], sdn[i], backend=be)  # noqa: E731
            ts[be] = timeit(fn)
            tab.add("shared", f"T={T} D={D} S={S}", be, ts[be], 3 * S * D * el + 2 * T * D * el, 2 * T * 3 * D * S,
                    None if be == "torch" else ts.get("torch"))

        # combine
        eo = ref_e
        res = (torch.randn(T, D, generator=g) * 0.1).to(dt).to(dev)
        ref_c = combine_ref(eo, w, ids, res, res)[0]
        ts = {}
        for be in backends:
            got = combine(eo, w, ids, res, res, backend=be)[0]
            assert_close(got, ref_c, "combine", dt, f"{be} T={T}")
            ts[be] = timeit(lambda: combine(eo, w, ids, res, res, backend=be))
            tab.add("combine", f"T={T} K={K} D={D}", be, ts[be], T * D * el * (K + 3) + T * K * 8, 0,
                    None if be == "torch" else ts.get("torch"))

    # dense mat-vec / small GEMM: the packed kernel vs torch's GEMM (sets cpu_weights.SMALL_N)
    if "cpu" in backends and dev.type == "cpu":
        for N, Kd in dense:
            wd = (torch.randn(N, Kd, generator=g) / Kd ** 0.5).to(dt)
            pw = pack_weight(wd)
            for T in (1, 4, 16, 64):
                x = (torch.randn(T, Kd, generator=g) * 0.1).to(dt)
                assert_close(linear_cpu(x, pw), (x.float() @ wd.float().t()).to(dt), "expert_ffn", dt,
                             f"linear T={T} N={N}")
                t_torch = timeit(lambda: x @ wd.t())
                t_cpu = timeit(lambda: linear_cpu(x, pw))
                tab.add("linear", f"T={T} N={N} K={Kd}", "torch", t_torch, N * Kd * el, 2 * T * N * Kd)
                tab.add("linear", f"T={T} N={N} K={Kd}", "cpu", t_cpu, N * Kd * el, 2 * T * N * Kd, t_torch)
    if "cpu" in backends and args.quant:
        bench_quant(args, tab, args.bandwidth, g)
    if any(b in ("cuda", "emu") for b in backends) and args.quant:
        bench_quant_cuda(args, tab, g, backends, dev)
    return tab.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--shape", default="bench-small", choices=sorted(SHAPES),
                    help="layer shapes to time (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weight and activation dtype (default: %(default)s)")
    ap.add_argument("--tokens", default="1,8,64,512", help="comma list of token counts T (default: %(default)s)")
    ap.add_argument("--backends", default="", help="comma list (default: every backend present but cuda; emu only in bfloat16)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda[:i] to time the cuda backend on a GPU (default: %(default)s)")
    ap.add_argument("--quant", default="8,4",
                    help="bits of the quantized ops to time (cpu, and cuda / emu), comma list, '' = none "
                         "(default: %(default)s)")
    ap.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                    help="group size of the quantized ops (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line (default: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global SYNC
    SYNC = sync_for(args.device)
    hbm = hbm_bandwidth(args.device)
    if hbm and not args.json:
        print(f"{hbm[0]}: HBM floor at {hbm[1] / 1e12:.2f} TB/s")
    bw = args.bandwidth = read_bandwidth()
    isa = native.native_module("cpu").cpu_isa if "cpu" in available_backends() else None
    if not args.json:
        print(f"read bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads); shape {args.shape}, {args.dtype}; "
              f"cpu kernels: {isa}")
    rows = bench(args)
    if args.json:
        print(json.dumps({"read_bandwidth_gb_s": bw / 1e9, "threads": args.threads, "shape": args.shape, "cpu_isa": isa,
                          "dtype": args.dtype, "rows": rows}))


if __name__ == "__main__":
    main()
