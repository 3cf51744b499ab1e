"""Several processes on torch.distributed (Gloo on CPUs, NCCL on GPUs; launched by `torchrun`):
the one place that knows about ranks. Everything else asks this module.

Two uses (README, "Several GPUs or nodes"):

* corpus parallel (the lens commands, the perplexity of prune): the corpus's padded batches are
  dealt out round-robin, batch i to rank i mod W. The batch, not the document, is the unit so
  every sample runs in exactly the batch it runs in alone (a kernel's rounding may depend on the
  batch's shape), which is what makes the results identical to one process. Every rank reads
  and tokenizes the whole corpus (cheap beside the forward passes) so the batches are the same
  everywhere. Integer counters are all-reduced (exact); float sums are gathered per batch and
  folded in batch order in float64 (`OrderedSum`, `in_order`), the order one process adds them
  in, so the sums are the same bits. Rank 0 writes the outputs.
* expert parallel (`Model.load(..., expert_parallel=True)`, `--expert-parallel`): every rank
  runs the same batch through the replicated dense parts (embedding, attention, norms, router,
  shared experts, combine, lm_head); rank r holds only routed experts [r*E/W, (r+1)*E/W) of each
  MoE layer (`expert_range`; the loader reads no others). `ExpertShard.expert_ffn` replaces the
  layer's expert compute: rank r is home of the r-th contiguous W-th of the tokens; it sends
  each of its (token, slot) pairs to the expert's rank with all_to_all_single (counts first),
  the owners run our expert kernels on what they received, send the rows back, and every rank
  all-gathers the [N, k_max, D] expert outputs. Routing, taps, usage counters and combine then
  run on every rank as in one process, so every intervention and tap works unchanged. The
  corpus is not sharded then (the ranks must run the same batches in lockstep).

Failure: the process group is made with a timeout (MOE_ENGINE_DIST_TIMEOUT seconds, default
300): a rank that dies or stalls makes the others' next collective raise DistributedError
within it (a closed connection raises at once) instead of hanging.

Shape legend (docs/shapes.md): N tokens, D hidden, E routed experts, k_max slot width, W ranks,
P (token, slot) pairs a rank sends, M pairs it receives.
"""
from __future__ import annotations

import datetime
import math
import os
import pickle

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MOE_ENGINE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0

_expert_parallel = False   # set by init(expert_parallel=True): corpus sharding is then off


class DistributedError(RuntimeError):
    """A collective failed: another rank died, stalled past the timeout, or disagreed."""


def launched() -> bool:
    """Started by torchrun (or anything that sets its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{TIMEOUT_ENV} = {raw!r}; expected a positive number of seconds")
    return t


def init(device=None, *, expert_parallel: bool = False) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
    LOCAL_RANK picks the GPU): NCCL for a cuda `device`, else Gloo, with the timeout above.
    Returns True when running with several processes. Without torchrun's variables (one
    process) it does nothing and returns False, unless expert_parallel, which needs them."""
    global _expert_parallel
    if not isinstance(expert_parallel, bool):
        raise TypeError(f"expert_parallel must be a bool, got {type(expert_parallel).__name__}")
    if not launched():
        if expert_parallel:
            raise ValueError("expert parallelism needs several processes: launch with "
                             "`torchrun --nproc-per-node N ...` (WORLD_SIZE is "
                             f"{os.environ.get('WORLD_SIZE', 'unset')})")
        return False
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE is set but {var} is not; launch with torchrun")
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=_timeout_s()))
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {os.environ['RANK']}: cannot join the process group "
                                   f"({e})") from None
    _expert_parallel = _expert_parallel or expert_parallel
    return True


def finish() -> None:
    """Leave the process group (the CLIs call it on the way out)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank: the group's, else torchrun's RANK (before init or after finish),
    else 0."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that writes outputs and prints."""
    return rank() == 0


def corpus_parallel() -> bool:
    """Batches are dealt out to the ranks (several processes, not expert parallel)."""
    return world() > 1 and not _expert_parallel


def mine(batch_index: int) -> bool:
    """Whether this rank runs batch `batch_index` of a corpus (round-robin)."""
    return not corpus_parallel() or batch_index % world() == rank()


def _collective(what: str, fn):
    try:
        return fn()
    except RuntimeError as e:  # Gloo/NCCL: a closed connection or the timeout
        raise DistributedError(f"rank {rank()}: {what} failed, so another rank died or stalled "
                               f"past the {_timeout_s():g} s timeout ({TIMEOUT_ENV}): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _comm(t: torch.Tensor) -> torch.Tensor:
    """The tensor on the device the backend talks from (Gloo: the CPU)."""
    if dist.get_backend() == "gloo" and t.device.type != "cpu":
        return t.cpu()
    return t


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum an integer tensor over the ranks of a corpus-parallel run, in place (exact)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"all_sum_ takes integer counters (exact in any order), got {t.dtype}; "
                        "fold float sums with OrderedSum")
    if not corpus_parallel():
        return t
    c = _comm(t)
    _collective("all_reduce", lambda: dist.all_reduce(c))
    if c is not t:
        t.copy_(c)
    return t


def sum_int(n: int) -> int:
    """all_sum_ of one Python int."""
    return int(all_sum_(torch.tensor(n, dtype=torch.int64)))


def in_order(items: list[tuple[int, object]]) -> list[object]:
    """This rank's (batch index, payload) pairs -> every rank's payloads in batch order (on
    every rank). One process: the payloads as given."""
    if not corpus_parallel():
        return [p for _, p in items]
    local = pickle.dumps([(i, _cpu(p)) for i, p in items])
    out: list = [None] * world()
    _collective("all_gather_object", lambda: dist.all_gather_object(out, local))
    merged = [x for blob in out for x in pickle.loads(blob)]
    merged.sort(key=lambda x: x[0])
    return [p for _, p in merged]


def _cpu(p):
    if isinstance(p, torch.Tensor):
        return p.cpu()
    if isinstance(p, (list, tuple)):
        return type(p)(_cpu(x) for x in p)
    if isinstance(p, dict):
        return {k: _cpu(v) for k, v in p.items()}
    return p


class OrderedSum:
    """A float64 total of per-batch partials, added in batch order whatever the sharding: one
    process adds each partial as it comes (total += part); several gather the partials and add
    them in the same order, so the total has the same bits."""

    def __init__(self, like: torch.Tensor):
        self.total = torch.zeros_like(like, dtype=torch.float64)
        self._parts: list[tuple[int, torch.Tensor]] = []

    def add(self, batch_index: int, part: torch.Tensor) -> None:
        if corpus_parallel():
            self._parts.append((batch_index, part.detach().to("cpu", torch.float64, copy=True)))
        else:
            self.total += part

    def result(self) -> torch.Tensor:
        if corpus_parallel():
            for p in in_order(self._parts):
                self.total += p.to(self.total.device)
            self._parts = []
        return self.total


# ---- expert parallelism -------------------------------------------------------------------------

def expert_range(E: int, r: int | None = None, W: int | None = None) -> tuple[int, int]:
    """Rank r's routed experts [lo, hi) of E over W ranks: [r*E//W, (r+1)*E//W) (uneven splits
    differ by at most one expert)."""
    r = rank() if r is None else r
    W = world() if W is None else W
    if not 0 <= r < W:
        raise ValueError(f"rank {r}: expected 0..{W - 1}")
    if E < W:
        raise ValueError(f"{E} routed experts cannot be split over {W} ranks; expected at most "
                         f"{E} processes")
    return r * E // W, (r + 1) * E // W


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """[R, D] of any dtype as [R, D * itemsize] uint8 (Gloo has no bf16 all_to_all)."""
    return x.contiguous().view(torch.uint8).view(x.shape[0], x.shape[1] * x.element_size())


class ExpertShard:
    """This rank's routed experts of one MoE layer and the exchange reaching the other ranks'
    (the module docstring). Attached as MoEWeights.ep by load_expert_parallel."""

    def __init__(self, layer: int, E: int):
        self.layer = layer
        self.E = E
        self.W = world()
        self.rank = rank()
        self.lo, self.hi = expert_range(E)
        self.bounds = torch.tensor([expert_range(E, r)[1] for r in range(self.W - 1)], dtype=torch.int64)
        self.sent_rows = 0   # (token, slot) pairs this rank sent to another rank (bench)

    def expert_ffn(self, u: torch.Tensor, ids: torch.Tensor, w, cpu, *, backend: str) -> torch.Tensor:
        """expert_out [N, k_max, D] (unweighted, zero in empty slots) of u [N, D] and ids
        [N, k_max] (global expert ids, -1 empty), every rank holding the same u and ids."""
        from .cpu_weights import expert_ffn_packed
        from .ops.expert_ffn import expert_ffn

        N, D = u.shape
        k_max = ids.shape[1]
        W, r, dev = self.W, self.rank, u.device
        a, b = r * N // W, (r + 1) * N // W                     # this rank's home tokens
        home = ids[a:b].long()                                  # [n, k_max]
        flat = home.reshape(-1)
        pair = (flat >= 0).nonzero().squeeze(1)                 # [P] flat (token, slot) index
        e = flat[pair]
        dest = torch.bucketize(e, self.bounds.to(dev), right=True)  # rank owning each expert
        order = torch.sort(dest, stable=True).indices
        pair, e, dest = pair[order], e[order], dest[order]
        send_counts = torch.bincount(dest, minlength=W).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        sc, rc = _comm(send_counts), _comm(recv_counts)
        _collective("all_to_all_single (counts)", lambda: dist.all_to_all_single(rc, sc))
        send = sc.tolist()
        recv = rc.tolist()
        self.sent_rows += sum(send) - send[r]
        x = u[a:b].index_select(0, torch.div(pair, k_max, rounding_mode="floor"))   # [P, D]
        x_in = torch.empty((sum(recv), D), dtype=u.dtype, device=dev)
        e_in = torch.empty(sum(recv), dtype=torch.int64, device=dev)
        self._a2a(x_in, x, recv, send)
        self._a2a(e_in, e, recv, send)
        if len(e_in):
            local = (e_in - self.lo).to(torch.int32).unsqueeze(1)      # [M, 1] local expert ids
            if cpu is not None:  # the packed experts (w holds only views of them)
                y = expert_ffn_packed(x_in, local, cpu.experts)
            else:
                y = expert_ffn(x_in, local, w.experts_gate_up, w.experts_down, backend=backend)
            y = y.view(-1, D)
        else:
            y = x_in
        back = torch.empty((len(pair), D), dtype=u.dtype, device=dev)
        self._a2a(back, y, send, recv)
        mine = torch.zeros((b - a) * k_max, D, dtype=u.dtype, device=dev)
        mine[pair] = back
        # every rank gets every home's rows: equal-size pieces (the largest home), then trimmed
        rows = -(-N // W) * k_max
        piece = torch.zeros((rows, D), dtype=u.dtype, device=dev)
        piece[:mine.shape[0]] = mine
        pieces = [torch.empty_like(_bytes(piece)) for _ in range(W)]
        pieces_c = [_comm(p) for p in pieces]
        _collective("all_gather (expert outputs)",
                    lambda: dist.all_gather(pieces_c, _comm(_bytes(piece))))
        out = [p.to(dev).view(u.dtype).view(rows, D)[:(((q + 1) * N // W) - (q * N // W)) * k_max]
               for q, p in enumerate(pieces_c)]
        return torch.cat(out).view(N, k_max, D)

    @staticmethod
    def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]):
        if inp.dtype.is_floating_point:
            o, i = _bytes(out), _bytes(inp)
        else:
            o, i = out, inp.contiguous()
        oc, ic = _comm(o), _comm(i)
        _collective("all_to_all_single", lambda: dist.all_to_all_single(
            oc, ic, output_split_sizes=out_splits, input_split_sizes=in_splits))
        if oc is not o:
            o.copy_(oc)


def start_expert_parallel(flag, device):
    """Model.load's expert_parallel=True: join the group; returns the expert filter for the
    loader (expert_range of this rank)."""
    if flag is not True:
        raise TypeError(f"expert_parallel must be a bool, got {type(flag).__name__} {flag!r}")
    init(device, expert_parallel=True)
    return expert_range


def attach_expert_shards(model) -> None:
    """After Model.load read this rank's experts: an ExpertShard on every MoE layer, and the
    cpu backend's one-call C++ paths off (they would run every expert in place)."""
    import dataclasses

    from .loader import MoEWeights

    shards = {l: ExpertShard(l, model.config.n_routed_experts)
              for l, lw in enumerate(model.weights.layers) if isinstance(lw.mlp, MoEWeights)}

    def attach():
        for l, shard in shards.items():
            model.weights.layers[l].mlp.ep = shard

    def no_one_call(cw):
        return cw if cw.decode_layers is None else dataclasses.replace(cw, decode_layers=None)

    attach()
    if model._cpu is not None:
        model._cpu = no_one_call(model._cpu)
    else:
        # packed later (a call with backend="cpu" on another backend's model): packing may
        # replace the layers' MoEWeights (quantized models), so the shards are attached again
        pack = model._cpu_weights

        def packed():
            if model._cpu is None:
                model._cpu = no_one_call(pack())
                attach()
            return model._cpu
        model._cpu_weights = packed
