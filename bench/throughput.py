"""End-to-end throughput: prefill and decode tokens/s, per-layer MoE time, and the decode step
against the memory-bandwidth floor of this machine (see bench/README.md for how to read it).

    python bench/throughput.py --preset bench-small --backend cpu --threads 2
    python bench/throughput.py --preset bench-small --backend cpu --topk 1 --json
    python bench/throughput.py --preset 16b-layer:layers=2 --backend cpu --moe-tokens 1,8,64,512
    python bench/throughput.py --model DIR --backend torch --dtype float32
    python bench/throughput.py --preset bench-small --quant int4 --group-size 128

Method: warm-up, then --reps repetitions of (prefill --prompt-len tokens x --batch sequences,
then --gen-len greedy decode steps); medians over repetitions (prefill) and steps (decode).
The floor: bytes of weights a decode step touches (every dense weight, the router, shared
experts and the distinct routed experts the step actually chose, the lm_head), divided by the
read bandwidth measured in this process (a sum over a buffer far larger than the caches, best
of 7, at the start and again at the end of the run; the faster of the two is used, because the
bandwidth of a shared machine drifts and a slow measurement would flatter the fractions).
fraction = floor time / measured step time (1.0 = bandwidth-bound with zero overhead).
With --quant int8|int4 the linears are quantized on load and the floor counts the bytes the
kernels stream for them (the quantized panels on the cpu backend, the GPTQ tensors elsewhere).
The last line of output with --json is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import hbm_bandwidth, sync_for  # noqa: E402  (bench/gpu.py)


BANDWIDTH_BUFFER_BYTES = 1 << 30  # far larger than a CPU's L3: any cache is negligible next to it
PROBE_BYTES = 256 << 20           # read right before every timed decode step / MoE-layer call:
                                  # 8x the L3, so it also flushes the caches as a real step would


def median_time(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


class BandwidthProbe:
    """Reads PROBE_BYTES and returns the bytes/s of that read: called right before each timed
    call, so each timing is paired with the bandwidth the machine had at that moment (on a
    shared host it drifts by 2x within a run). It also leaves the caches holding only the probe."""

    def __init__(self):
        self.buf = torch.ones(PROBE_BYTES // 4, dtype=torch.float32)
        self.buf.sum()

    def __call__(self) -> float:
        t = time.perf_counter()
        self.buf.sum()
        return PROBE_BYTES / (time.perf_counter() - t)


def read_bandwidth(reps: int = 7) -> float:
    """Bytes/s of a streaming read: an fp32 sum over a buffer far larger than the caches; the
    best of `reps` (the machine's memory is shared with other tenants and its bandwidth drifts,
    so the floor uses the fastest read seen: fractions err low, never high)."""
    buf = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    buf.sum()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        buf.sum()
        ts.append(time.perf_counter() - t)
    del buf
    return BANDWIDTH_BUFFER_BYTES / min(ts)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB); it includes
    the bandwidth measurement's buffer (BANDWIDTH_BUFFER_BYTES), freed before the model loads."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def rss_gib() -> float:
    """This process's resident memory now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def cpu_isa() -> str | None:
    """Which build of the CPU kernels _C holds (csrc/cpu/simd.h): avx512, avx2 or portable."""
    from moe_engine.ops import available_backends
    from moe_engine.ops import backend as backends
    return backends.native_module("cpu").cpu_isa if "cpu" in available_backends() else None


def cpu_isa_note() -> str:
    isa = cpu_isa()
    return "" if isa is None else f" (cpu kernels: {isa})"


def parse_preset(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k != "layers":
            raise SystemExit(f"--preset {spec}: unknown option {k!r} (only layers=N)")
        opts["layers"] = int(v)
    return name, opts


def show_progress(args) -> bool:
    return not args.json and sys.stderr.isatty()


def load_model(args):
    import moe_engine
    from moe_engine.synthetic import make_checkpoint
    device = "cuda" if args.backend == "cuda" else "cpu"
    q = {} if args.quant is None else {"quant": args.quant, "group_size": args.group_size, "sym": args.sym}
    q["cuda_graph"] = False if args.no_cuda_graph else None
    if args.quant_lm_head:
        q.update(quant_lm_head=True, group_size=args.group_size, sym=args.sym)
    if args.model:
        return moe_engine.load(args.model, dtype=args.dtype, device=device, backend=args.backend,
                               progress=show_progress(args), **q)
    name, opts = parse_preset(args.preset)
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as d:
        path = make_checkpoint(d, name, seed=args.seed, dtype=args.dtype, **opts)
        return moe_engine.load(path, dtype=args.dtype, device=device, backend=args.backend,
                               progress=show_progress(args), **q)


def nbytes(w, el: int) -> int:
    """Bytes a kernel streams for one read of a linear: a tensor's elements (or a cpu-packed
    bf16/fp32 linear's: its panels hold the same, plus padding); a QuantizedWeight's GPTQ tensors;
    a cpu-packed quantized linear's share of its quantized panels (q, k and v share one
    PackedQWeight, split by rows)."""
    from moe_engine.ops.quant import PackedQWeight
    if isinstance(w, torch.Tensor):
        return w.numel() * el
    if hasattr(w, "packed"):  # cpu_weights.PackedRows
        if not isinstance(w.packed, PackedQWeight):
            return math.prod(w.shape) * el
        return w.packed.nbytes * (w.stop - w.start) // w.packed.Dout
    return w.nbytes  # quant.QuantizedWeight


class Bytes:
    """Weight bytes a forward pass reads, by part, for the floor."""

    def __init__(self, model):
        c, w = model.config, model.weights
        self.el = torch.empty(0, dtype=model.dtype).element_size()
        E, D, F = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size
        el = self.el
        self.expert = 3 * D * F * el  # one routed expert (quantized: its share of the stacked weights)
        self.dense = 0   # attention of every layer, dense MLPs, routers, shared experts
        for lw in w.layers:
            self.dense += sum(nbytes(t, el) for t in (lw.q, lw.k, lw.v, lw.o))
            m = lw.mlp
            if hasattr(m, "router"):
                self.dense += nbytes(m.router, el)
                self.expert = (nbytes(m.experts_gate_up, el) + nbytes(m.experts_down, el)) // E
                if m.shared is not None:
                    self.dense += nbytes(m.shared.gate_up, el) + nbytes(m.shared.down, el)
            else:
                self.dense += nbytes(m.gate_up, el) + nbytes(m.down, el)
        self.lm_head = nbytes(w.lm_head, el)  # quant_lm_head: its quantized panels

    def step(self, distinct_experts: int) -> int:
        return self.dense + self.lm_head + distinct_experts * self.expert


def flops_per_token(model, topk: int | None) -> float:
    """2 x (multiply-adds per token in the weight GEMMs); attention scores excluded."""
    c, w = model.config, model.weights
    k = c.num_experts_per_tok if topk is None else topk
    f = 0
    for lw in w.layers:
        f += sum(math.prod(t.shape) for t in (lw.q, lw.k, lw.v, lw.o))
        m = lw.mlp
        if hasattr(m, "router"):
            f += math.prod(m.router.shape) + k * 3 * c.hidden_size * c.moe_intermediate_size
            if m.shared is not None:
                f += math.prod(m.shared.gate_up.shape) + math.prod(m.shared.down.shape)
        else:
            f += math.prod(m.gate_up.shape) + math.prod(m.down.shape)
    return 2.0 * f


def run_generation(model, args, reps: int, bar=None, probe=None):
    """Returns (prefill seconds per rep, decode step seconds, distinct experts per step and layer,
    read bandwidth right before each step (empty without a probe))."""
    c = model.config
    kw = {} if args.topk is None else {"topk": args.topk}
    g = torch.Generator().manual_seed(args.seed)
    prefill_s, step_s, distinct, step_bw = [], [], [], []
    moe = c.moe_layers
    for _ in range(reps):
        prompt = torch.randint(0, c.vocab_size, (args.batch, args.prompt_len), generator=g)
        cache = model.new_cache(args.batch, args.prompt_len + args.gen_len)
        usage = model.new_usage_counters()
        t = time.perf_counter()
        logits = model(prompt, cache=cache, logits="last", usage=usage, **kw)
        prefill_s.append(time.perf_counter() - t)
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(args.gen_len - 1):
            before = usage.clone()
            if probe is not None:
                step_bw.append(probe())
            t = time.perf_counter()
            logits = model(tok, cache=cache, logits="last", usage=usage, **kw)
            step_s.append(time.perf_counter() - t)
            tok = logits.argmax(-1, keepdim=True)
            chosen = (usage - before)[list(moe)] > 0
            distinct.append(chosen.sum(1).float().mean().item() if moe else 0.0)
            if bar is not None:
                bar.update(1)
    return prefill_s, step_s, distinct, step_bw


def decode_overhead(model, args, steps: int = 40) -> dict:
    """Where a decode step's time goes: inside the C++ kernels of moe_engine._C (timed by
    wrapping its entry points) vs everything else (Python, torch ops, allocation)."""
    from moe_engine import _C
    names = [n for n in dir(_C) if n.endswith("_cpu") and callable(getattr(_C, n))]
    spent = {"s": 0.0}
    saved = {n: getattr(_C, n) for n in names}

    def timed(f):
        def call(*a):
            t = time.perf_counter()
            f(*a)
            spent["s"] += time.perf_counter() - t
        return call
    kw = {} if args.topk is None else {"topk": args.topk}
    cache = model.new_cache(args.batch, args.prompt_len + steps + 1)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len))
    tok = model(prompt, cache=cache, logits="last", **kw).argmax(-1, keepdim=True)
    total, inside = [], []
    try:
        for n in names:
            setattr(_C, n, timed(saved[n]))
        for _ in range(steps):
            spent["s"] = 0.0
            t = time.perf_counter()
            tok = model(tok, cache=cache, logits="last", **kw).argmax(-1, keepdim=True)
            total.append(time.perf_counter() - t)
            inside.append(spent["s"])
    finally:
        for n in names:
            setattr(_C, n, saved[n])
    step, kern = statistics.median(total), statistics.median(inside)
    return {"step_ms": step * 1e3, "kernels_ms": kern * 1e3, "outside_kernels_ms": (step - kern) * 1e3,
            "outside_fraction": (step - kern) / step}


def moe_layer_times(model, args, tokens: int, reps: int) -> dict:
    """Median us of one MoE layer's FFN (router .. combine) on `tokens` random tokens, cycling
    through the MoE layers with fresh inputs each rep (fresh routing: no cache-resident experts)."""
    from moe_engine.cpu_weights import dense
    from moe_engine.interventions import Interventions
    from moe_engine.moe import moe_layer
    from moe_engine.ops.route import route_ref
    c = model.config
    layers = c.moe_layers
    routing = Interventions(topk=args.topk).resolve(c, model.device)
    cpu = model._cpu_weights() if model.backend == "cpu" else None
    g = torch.Generator().manual_seed(args.seed + tokens)
    dev = model.device
    inputs = [(torch.randn(tokens, c.hidden_size, generator=g).to(model.dtype).to(dev),
               torch.randn(tokens, c.hidden_size, generator=g).to(model.dtype).to(dev)) for _ in range(reps + 2)]
    by = Bytes(model)
    # on a GPU the floor is the HBM's (bench/gpu.py); on the CPU the read bandwidth of the moment
    hbm = hbm_bandwidth(dev)
    probe = (lambda: hbm[1]) if hbm else BandwidthProbe() if dev.type == "cpu" else None
    if probe is None:
        raise SystemExit(f"error: no HBM bandwidth known for {torch.cuda.get_device_name(dev)} "
                         f"(bench/gpu.py HBM_BYTES_S), so no floor can be given")
    sync = sync_for(dev)
    ts, floors = [], []
    for i, (u, r) in enumerate(inputs):
        l = layers[i % len(layers)]
        w = model.weights.layers[l].mlp
        lc = None if cpu is None else cpu.layers[l].moe
        bw = probe()  # also evicts: in a real step the other layers' weights pass through the caches
        sync()
        t = time.perf_counter()
        moe_layer(u, r, w, routing, l, backend=model.backend, cpu=lc, fused=model._runner(model.backend).fused_moe(None))
        sync()
        dt = time.perf_counter() - t
        if i < 2:
            continue  # warm-up
        ids = route_ref(u @ dense(w.router, model.dtype).t(), routing.k[l])[0]
        n_exp = int(torch.unique(ids[ids >= 0]).numel())
        layer_bytes = nbytes(w.router, by.el) + n_exp * by.expert
        if w.shared is not None:
            layer_bytes += nbytes(w.shared.gate_up, by.el) + nbytes(w.shared.down, by.el)
        ts.append(dt)
        floors.append(layer_bytes / bw)
    t_med = statistics.median(ts)
    k = routing.k[layers[0]]
    fl = 2 * tokens * (c.n_routed_experts * c.hidden_size + 3 * c.hidden_size *
                       (k * c.moe_intermediate_size + c.shared_width))
    return {"tokens": tokens, "moe_layer_us": t_med * 1e6, "floor_us": statistics.median(floors) * 1e6,
            "bandwidth_floor_fraction": statistics.median(f / t for f, t in zip(floors, ts)),
            "gflop_s": fl / t_med / 1e9}


def torch_expert_gemm_us(model, args, tokens: int, reps: int) -> dict:
    """The same routed-expert work as PyTorch's own GEMMs would do it: per-expert segments of the
    routed tokens through torch bf16/fp32 GEMMs (gate_up, SiLU*up, down). The bar for prefill."""
    from moe_engine.cpu_weights import dense_all
    from moe_engine.interventions import Interventions
    from moe_engine.ops.expert_ffn import expert_ffn_ref
    from moe_engine.ops.route import route_ref
    c = model.config
    l = c.moe_layers[0]
    w = model.weights.layers[l].mlp
    # tensors for torch (the cpu backend holds only the panels: unpacked here, for this bench)
    router, gate_up, down = dense_all([w.router, w.experts_gate_up, w.experts_down], model.dtype)
    k = Interventions(topk=args.topk).resolve(c, model.device).k[l]
    u = torch.randn(tokens, c.hidden_size, generator=torch.Generator().manual_seed(args.seed)).to(model.dtype)
    ids = route_ref(u @ router.t(), k)[0]
    t = median_time(lambda: expert_ffn_ref(u, ids, gate_up, down), reps)
    fl = 2 * tokens * k * 3 * c.hidden_size * c.moe_intermediate_size
    # The best case for torch: the same FLOPs as two dense GEMMs over all T*k slot rows at once
    # (one expert's weights standing in for all: no grouping, no per-expert calls).
    xs = u.repeat_interleave(k, 0)
    gu0, dn0 = gate_up[0], down[0]
    F = c.moe_intermediate_size

    def dense():
        h = xs @ gu0.t()
        return (torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ dn0.t()
    t_dense = median_time(dense, reps)
    # The ours-side twin: the routed experts alone through the dispatcher on this backend.
    from moe_engine.ops.expert_ffn import expert_ffn
    packed = model._cpu_weights().layers[l].moe.experts if model.backend == "cpu" else None
    t_ours = median_time(lambda: expert_ffn(u, ids, gate_up, down, backend=model.backend, packed=packed), reps)
    return {"tokens": tokens, "torch_gemm_us": t * 1e6, "torch_gemm_gflop_s": fl / t / 1e9,
            "torch_dense_gemm_us": t_dense * 1e6, "torch_dense_gemm_gflop_s": fl / t_dense / 1e9,
            "ours_us": t_ours * 1e6, "ours_gflop_s": fl / t_ours / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="a Hugging Face DeepSeekMoE checkpoint directory (default: none, --preset)")
    src.add_argument("--preset", default="bench-small",
                     help="random weights of a preset shape: bench-small | 16b-layer | tiny, "
                          "optionally :layers=N (default bench-small)")
    ap.add_argument("--backend", default="cpu", choices=("torch", "cpu", "cuda", "emu", "auto"),
                    help="kernels of the MoE layer (default: %(default)s)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weight and activation dtype (default: %(default)s)")
    ap.add_argument("--topk", type=int, default=None, help="routed experts per token (default: the model's)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=512,
                    help="prompt tokens per sequence; with --gen-len within the model's context (default: %(default)s)")
    ap.add_argument("--gen-len", type=int, default=64, help="decode steps per repetition (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="generation repetitions after the warm-up (default: %(default)s)")
    ap.add_argument("--moe-tokens", default="",
                    help="comma list of token counts for the per-MoE-layer table (default: the batch "
                         "size and the prefill size)")
    ap.add_argument("--no-generate", action="store_true", help="only the per-MoE-layer table (default: off)")
    ap.add_argument("--no-cuda-graph", action="store_true",
                    help="run decode steps op by op instead of replaying a captured CUDA graph "
                         "(default: graphs on with the cuda backend)")
    ap.add_argument("--profile-overhead", action="store_true",
                    help="cpu backend: split a decode step into time inside the C++ kernels and "
                         "outside them, with the fused MoE-layer call and with the op-by-op path (default: off)")
    ap.add_argument("--no-fused-moe", action="store_true",
                    help="cpu backend: run every MoE layer op by op, never as one C++ call (runner.Runner.fused_moe), "
                         "to measure what that call saves (default: off)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: %(default)s)")
    ap.add_argument("--quant", default=None, choices=("int8", "int4"),
                    help="quantize the linears on load (default: none, the load dtype)")
    ap.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                    help="--quant group size (default: %(default)s)")
    ap.add_argument("--sym", action="store_true", help="--quant symmetric (default: asymmetric)")
    ap.add_argument("--quant-lm-head", action="store_true",
                    help="quantize the lm_head to 8-bit on load (the model's group size and symmetry; "
                         "default: as the checkpoint stores it)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line (default: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_fused_moe:
        import moe_engine.runner as rn
        rn.Runner.fused_moe = lambda self, capture: False
    say = (lambda *a: None) if args.json else print

    bw = read_bandwidth()
    say(f"read bandwidth {bw / 1e9:.1f} GB/s ({args.threads} threads, best of 7 sums over {BANDWIDTH_BUFFER_BYTES >> 20} "
        f"MiB fp32; each timed step below is paired with its own {PROBE_BYTES >> 20} MiB read)")
    t = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - t
    c = model.config
    if not args.no_generate and args.prompt_len + args.gen_len > c.max_position_embeddings:
        print(f"error: --prompt-len {args.prompt_len} + --gen-len {args.gen_len} = "
              f"{args.prompt_len + args.gen_len} tokens exceed the model's context of "
              f"{c.max_position_embeddings} (max_position_embeddings); expected --prompt-len <= "
              f"{c.max_position_embeddings - args.gen_len}", file=sys.stderr)
        raise SystemExit(2)
    qnote = "" if args.quant is None else f" ({args.quant} g{args.group_size} {'sym' if args.sym else 'asym'} linears)"
    qnote += " (int8 lm_head)" if args.quant_lm_head else ""
    say(f"model {args.model or args.preset}: {c.num_hidden_layers} layers, D={c.hidden_size}, "
        f"E={c.n_routed_experts} F={c.moe_intermediate_size} top-{args.topk or c.num_experts_per_tok}, "
        f"{args.dtype}{qnote}, backend {model.backend}{cpu_isa_note()}, loaded in {load_s:.1f}s, "
        f"resident {rss_gib():.2f} GiB")
    result = {"model": args.model or args.preset, "backend": model.backend, "cpu_isa": cpu_isa(), "dtype": args.dtype,
              "quant": None if args.quant is None else {"bits": int(args.quant[3:]), "group_size": args.group_size,
                                                        "sym": args.sym},
              "quant_lm_head": args.quant_lm_head,
              "threads": args.threads, "topk": args.topk or c.num_experts_per_tok, "batch": args.batch,
              "cuda_graph": model._graphs is not None,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "read_bandwidth_gb_s": bw / 1e9,
              "load_s": load_s, "rss_after_load_gib": rss_gib()}

    # -- timings (fractions of the floor come after the second bandwidth measurement) --
    if not args.no_generate:
        quiet = not show_progress(args)
        warm = argparse.Namespace(**{**vars(args), "prompt_len": min(args.prompt_len, 16), "gen_len": 4})
        run_generation(model, warm, 1)
        with tqdm(total=args.reps * (args.gen_len - 1), desc="decode steps", disable=quiet, file=sys.stderr) as bar:
            prefill_s, step_s, distinct, step_bw = run_generation(model, args, args.reps, bar, BandwidthProbe())

    # (both profile the bf16 one-call paths and torch's bf16 GEMMs: not a quantized model's)
    if args.profile_overhead and model.backend == "cpu" and not args.no_generate and args.quant is None:
        import moe_engine.runner as rn
        o = decode_overhead(model, args)
        max_b, fused_moe = rn.DECODE_STEP_MAX_B, rn.Runner.fused_moe
        rn.DECODE_STEP_MAX_B = 0  # no one-call decode step: forward's layer loop, one C++ call per MoE layer
        try:
            u = decode_overhead(model, args)
            rn.Runner.fused_moe = lambda self, capture: False  # and the op-by-op MoE layer
            v = decode_overhead(model, args)
        finally:
            rn.DECODE_STEP_MAX_B, rn.Runner.fused_moe = max_b, fused_moe
        result["decode_overhead"] = {"one_call_step": o, "fused_layer": u, "op_by_op_layer": v}

    tokens = ([int(x) for x in args.moe_tokens.split(",")] if args.moe_tokens
              else sorted({args.batch, args.batch * args.prompt_len}))
    rows = [moe_layer_times(model, args, n, max(5, min(40, 2000 // max(n, 1)))) for n in tokens]
    big = max(tokens)
    g = (torch_expert_gemm_us(model, args, big, 5) if big >= 64 and model.device.type == "cpu" and args.quant is None
         else None)

    if not args.no_generate:
        pre = statistics.median(prefill_s)
        step = statistics.median(step_s)
        n_distinct = statistics.median(distinct) if distinct else 0.0
        by = Bytes(model)
        step_bytes = by.step(round(n_distinct * len(c.moe_layers)))
        # each step against the bandwidth read right before it; the median of those fractions
        fractions = [by.step(round(d * len(c.moe_layers))) / b / s for d, b, s in zip(distinct, step_bw, step_s)]
        fraction = statistics.median(fractions)
        bw_decode = statistics.median(step_bw)
        floor = step_bytes / bw_decode
        fpt = flops_per_token(model, args.topk)
        result.update({
            "prefill_tok_s": args.batch * args.prompt_len / pre,
            "prefill_ms": pre * 1e3,
            "prefill_gflop_s": fpt * args.batch * args.prompt_len / pre / 1e9,
            "decode_tok_s": args.batch / step,
            "decode_step_ms": step * 1e3,
            "decode_step_p10_p90_ms": [statistics.quantiles(step_s, n=10)[0] * 1e3,
                                       statistics.quantiles(step_s, n=10)[-1] * 1e3] if len(step_s) > 1 else None,
            "distinct_experts_per_moe_layer": n_distinct,
            "decode_bytes_per_step": step_bytes,
            "decode_read_bandwidth_gb_s": bw_decode / 1e9,
            "decode_read_bandwidth_p10_p90_gb_s": [statistics.quantiles(step_bw, n=10)[0] / 1e9,
                                                   statistics.quantiles(step_bw, n=10)[-1] / 1e9],
            "bandwidth_floor_ms": floor * 1e3,
            "bandwidth_floor_fraction": fraction})
        say(f"prefill  {result['prefill_tok_s']:10.1f} tok/s   ({args.batch}x{args.prompt_len} tokens in "
            f"{pre * 1e3:.1f} ms, {result['prefill_gflop_s']:.1f} GFLOP/s in the weight GEMMs)")
        say(f"decode   {result['decode_tok_s']:10.1f} tok/s   (step {step * 1e3:.2f} ms median, p10-p90 "
            f"{result['decode_step_p10_p90_ms'][0]:.2f}-{result['decode_step_p10_p90_ms'][1]:.2f} ms)")
        q = result["decode_read_bandwidth_p10_p90_gb_s"]
        say(f"floor    {floor * 1e3:.2f} ms/step = {step_bytes / 1e6:.1f} MB of weights "
            f"({n_distinct:.1f} distinct experts per MoE layer) / {bw_decode / 1e9:.1f} GB/s (median of the "
            f"reads paired with the steps, p10-p90 {q[0]:.1f}-{q[1]:.1f})  -> {fraction:.0%} of the floor "
            f"reached (median over steps of floor / step)")
    if "decode_overhead" in result:
        for name, key in (("one C++ call per step", "one_call_step"), ("one C++ call per MoE layer", "fused_layer"),
                          ("op-by-op MoE layer", "op_by_op_layer")):
            r = result["decode_overhead"][key]
            say(f"decode step, {name}: {r['step_ms']:.2f} ms = {r['kernels_ms']:.2f} ms in C++ kernels + "
                f"{r['outside_kernels_ms']:.2f} ms outside ({r['outside_fraction']:.0%})")

    hbm = hbm_bandwidth(model.device)
    floor_of = f"the HBM of {hbm[0]} at {hbm[1] / 1e12:.2f} TB/s" if hbm else "the read bandwidth paired with each call"
    say(f"\nper MoE layer (router .. combine), median over cycled layers and fresh inputs; floor: {floor_of}:")
    say(f"{'tokens':>7} {'us':>10} {'floor us':>10} {'fraction':>9} {'GFLOP/s':>9}")
    for r in rows:
        say(f"{r['tokens']:7d} {r['moe_layer_us']:10.1f} {r['floor_us']:10.1f} {r['bandwidth_floor_fraction']:9.0%} "
            f"{r['gflop_s']:9.1f}")
    result["moe_layers"] = rows
    result["moe_layer_us"] = rows[0]["moe_layer_us"]
    if result.get("bandwidth_floor_fraction") is None:
        result["bandwidth_floor_fraction"] = rows[0]["bandwidth_floor_fraction"]
    if g is not None:
        result["routed_experts_vs_torch_gemm"] = g
        say(f"\nrouted experts at {big} tokens: ours {g['ours_us']:.0f} us ({g['ours_gflop_s']:.1f} GFLOP/s) vs "
            f"PyTorch {args.dtype} GEMMs per expert segment {g['torch_gemm_us']:.0f} us "
            f"({g['torch_gemm_gflop_s']:.1f} GFLOP/s): {g['torch_gemm_us'] / g['ours_us']:.2f}x")
        say(f"  torch's best case, the same FLOPs as one dense GEMM pair over all {big * result['topk']} "
            f"slot rows: {g['torch_dense_gemm_us']:.0f} us ({g['torch_dense_gemm_gflop_s']:.1f} GFLOP/s): "
            f"ours at {g['torch_dense_gemm_us'] / g['ours_us']:.2f}x of it")
    result["peak_rss_gib"] = peak_rss_gib()
    say(f"\npeak resident memory {result['peak_rss_gib']:.2f} GiB")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
