"""Expert parallelism on torch.distributed: tokens/s with 1, 2 and 3 processes on this machine
(Gloo over loopback), the bytes each MoE layer exchanges per token, and a model on paper of the
same layer on 8 GPUs over NVLink and on 2 nodes of 8 GPUs over InfiniBand.

    python bench/distributed.py                      # bundled small model, 1 2 3 processes
    python bench/distributed.py --model DIR --procs 1,2 --batch 4 --prompt-len 64 --gen-len 16
    python bench/distributed.py --paper-only         # the on-paper model only (no runs)

Method: the script launches itself W times with torchrun's variables (a free port on 127.0.0.1),
W = 1 being the plain one-process model; each process loads the model (expert_parallel=True for
W > 1), warms up, then runs --reps times a prefill of --batch x --prompt-len tokens and --gen-len
greedy decode steps, a barrier before and after each timed part; rank 0 reports the medians.
Every rank runs the whole batch through the dense parts (distributed.py), so on one CPU the
processes only share out the routed experts: expect W > 1 to be slower here, not faster. The
numbers measure the exchange's overhead, not a speed-up.

Bytes per token per MoE layer, as implemented (distributed.ExpertShard): each of the k routed
slots of a token leaves its home rank with probability (W-1)/W under balanced routing, carrying
D values out and D values back (2 * D * itemsize bytes) plus its 8-byte expert id; then every
rank gathers the others' expert outputs, k * D * itemsize bytes per token per receiving rank.
Measured: the slots each rank actually sent (ExpertShard.sent_rows), in bytes per token.

The model on paper (--paper-only prints it alone) for DeepSeekMoE-16B's MoE layer (D = 2048,
k = 6, bf16) for a batch of n tokens per step:
    time = messages * latency + bytes on the slowest link / link bandwidth
with, per layer: two all-to-alls (out and back) of (W-1) messages each and one all-gather
((W-1) messages). Assumptions (published link rates, not measured here; the figures are LINKS
below, and bench/README.md's table repeats them):
  * NVLink: 8 H100 SXM GPUs, NVLink 4, half of its published bidirectional rate each way;
    all-to-all at the link rate; 5 us per message (launch plus NVSwitch hop).
  * InfiniBand: 2 nodes x 8 GPUs, one NDR (400 Gb per second) NIC per GPU; half of a rank's
    destinations are on the other node, so half its bytes cross InfiniBand (the NVLink share is
    negligible beside it); 10 us per message.
  * balanced routing (each expert equally likely), no overlap of communication with compute,
    and the all-gather of expert outputs counted (a design with data-parallel attention would
    drop it and keep only the two all-to-alls).
The numbers go in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

LINKS = {  # name: (ranks, bytes/s each way per rank, seconds per message, share of bytes on it)
    "8 GPUs, NVLink 4": (8, 450e9, 5e-6, 1.0),
    "2 nodes x 8 GPUs, NDR InfiniBand": (16, 50e9, 10e-6, 0.5),
}
PAPER_LAYER = dict(D=2048, k=6, itemsize=2)   # DeepSeekMoE-16B's MoE layer in bf16


def layer_bytes_per_token(D: int, k: int, itemsize: int, W: int) -> dict[str, float]:
    """Bytes one rank sends per token of its own for one MoE layer (balanced routing)."""
    away = k * (W - 1) / W
    a2a = away * (2 * D * itemsize + 8)          # hidden out + ids, expert output back
    gather = (W - 1) * k * D * itemsize           # its tokens' expert outputs to every other rank
    return {"all_to_all": a2a, "all_gather": gather, "total": a2a + gather}


def paper_model(n_tokens: int, W: int, bw: float, lat: float, share: float, D: int, k: int,
                itemsize: int) -> dict[str, float]:
    b = layer_bytes_per_token(D, k, itemsize, W)
    per_rank_tokens = n_tokens / W
    t_a2a = 2 * (W - 1) * lat + share * b["all_to_all"] * per_rank_tokens / bw
    t_gather = (W - 1) * lat + share * b["all_gather"] * per_rank_tokens / bw
    return {"a2a_us": t_a2a * 1e6, "gather_us": t_gather * 1e6, "total_us": (t_a2a + t_gather) * 1e6}


def print_paper() -> None:
    L = PAPER_LAYER
    print(f"on paper: DeepSeekMoE-16B MoE layer, D={L['D']}, k={L['k']}, bf16; per layer per step")
    print(f"{'link':34s} {'W':>3s} {'tokens':>7s} {'KB/token':>9s} {'a2a us':>8s} {'gather us':>10s} {'total us':>9s}")
    for name, (W, bw, lat, share) in LINKS.items():
        kb = layer_bytes_per_token(W=W, **L)["total"] / 1024
        for n in (W, 64, 4096):
            m = paper_model(n, W, bw, lat, share, **L)
            print(f"{name:34s} {W:3d} {n:7d} {kb:9.1f} {m['a2a_us']:8.1f} {m['gather_us']:10.1f} {m['total_us']:9.1f}")


# ---- runs on this machine ------------------------------------------------------------------------

def worker(args) -> None:
    import torch

    import moe_engine
    from moe_engine import distributed as D

    torch.set_num_threads(args.threads)
    W = int(os.environ.get("WORLD_SIZE", "1"))
    model = moe_engine.load(args.model, dtype=args.dtype, progress=False, expert_parallel=W > 1)
    if W > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    else:
        barrier = lambda: None  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)

    def run():
        cache = model.new_cache(args.batch, args.prompt_len + args.gen_len)
        barrier()
        t0 = time.perf_counter()
        logits = model.forward(ids, cache=cache, logits="last")
        barrier()
        t1 = time.perf_counter()
        for _ in range(args.gen_len):
            logits = model.forward(logits.argmax(-1).unsqueeze(1), cache=cache, logits="last")
        barrier()
        return t1 - t0, time.perf_counter() - t1

    run()  # warm-up
    shards = [lw.mlp.ep for lw in model.weights.layers if getattr(lw.mlp, "ep", None) is not None]
    for s in shards:
        s.sent_rows = 0
    times = [run() for _ in range(args.reps)]
    pre = statistics.median(t[0] for t in times)
    dec = statistics.median(t[1] for t in times)
    tokens_per_rep = args.batch * (args.prompt_len + args.gen_len)
    sent = sum(s.sent_rows for s in shards)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    sent_bytes = sent * (2 * model.config.hidden_size * itemsize + 8)   # out + back + ids
    if W > 1:
        sent_bytes = _sum_all(sent_bytes)
    if D.is_main():
        n_layers = max(len(shards), 1)
        # per token of the batch (every rank holds the whole batch; each is home of 1/W of it)
        per_tok = sent_bytes / (args.reps * tokens_per_rep * n_layers)
        print(json.dumps({"W": W, "prefill_tok_s": args.batch * args.prompt_len / pre,
                          "decode_tok_s": args.batch / (dec / args.gen_len),
                          "a2a_bytes_per_token_per_layer": per_tok}))
    D.finish()


def _sum_all(x: int) -> int:
    import torch
    import torch.distributed as dist
    t = torch.tensor(int(x), dtype=torch.int64)
    dist.all_reduce(t)
    return int(t)


def launch(args, W: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.abspath(__file__), "--worker"] + [a for a in sys.argv[1:]]
    procs = []
    for r in range(W):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(W),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        if W == 1:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(k)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"error: a process of the {W}-process run failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--procs", default="1,2,3", help="process counts to run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--paper-only", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for flag in ("batch", "prompt_len", "gen_len", "reps", "threads"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1", file=sys.stderr)
            return 2
    if args.worker:
        worker(args)
        return 0
    if not args.paper_only:
        try:
            procs = [int(x) for x in args.procs.split(",")]
        except ValueError:
            print(f"error: --procs {args.procs!r}: expected comma-separated integers", file=sys.stderr)
            return 2
        print(f"{'W':>3s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'a2a B/token/layer':>18s}")
        for W in procs:
            r = launch(args, W)
            print(f"{W:3d} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} "
                  f"{r['a2a_bytes_per_token_per_layer']:18.1f}", flush=True)
    print_paper()
    return 0


if __name__ == "__main__":
    sys.exit(main())
