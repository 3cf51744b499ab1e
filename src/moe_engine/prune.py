"""Expert pruning from routing statistics: keep, per MoE layer, the experts a calibration corpus
routes to most, remove the rest, and measure what that costs on held-out text.

    python -m moe_engine.prune --corpus en=cal/en.txt --corpus code=cal/code/ \\
        --heldout en=held/en.txt --heldout code=held/code/ --keep 16 --out prune/
    python -m moe_engine.prune ... --keep-mass 0.9 --out prune/

Calibration counts (token, slot) hits per expert over every --corpus domain together (the
device usage counters of lens.route_corpus). --keep N keeps the N most-hit experts of each
layer (ties: lower id); --keep-mass F keeps, per layer, the fewest experts whose hits cover at
least F of the layer's hits; either way at least k (the model's top-k) stay. The removed
experts become an expert mask with mask_mode "reroute": a removed expert can never be chosen,
the router's next choice takes its slot -- the model behaves as if the experts were gone, except that the router's softmax still spans
all E experts (so unrenormalised weights stay those of the full model). --checkpoint (with
--keep) also writes a smaller checkpoint, OUT/model: the removed experts and their router rows
dropped, the kept ones renumbered in id order; its softmax spans the kept experts only, so it
equals the masked model exactly when the top-k weights are renormalised.

Writes to --out: mask.json (the calibrated mask: `load_mask(path)` gives the bool [L, E] tensor
every interventions call accepts as expert_mask=, and `python -m moe_engine.lens ...
--expert-mask-file mask.json` reads it), mask_random.json (the same number of experts per layer
chosen uniformly at random, --seed), prune.json and prune.csv: per held-out domain the
perplexity (geometric mean over samples) of the full model, the calibrated pruning and the
random pruning.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lens import corpus as C
from . import distributed
from .lens.analyses import _batches, _sample_nll, route_corpus
from .model import Model
from .taps import Capture, TapRequest

MASK_FORMAT = "moe_engine.expert_mask/1"


def choose_experts(hits: torch.Tensor, moe_layers, *, keep: int | None = None,
                   keep_mass: float | None = None, min_keep: int = 1) -> torch.Tensor:
    """Bool [L, E] mask, True = removed, from hits [L, E] (rows of dense layers all False).
    At least min_keep experts stay per layer (the model's k: a token must find k experts)."""
    if (keep is None) == (keep_mass is None):
        raise ValueError("give exactly one of keep (experts per layer) and keep_mass (fraction)")
    L, E = hits.shape
    if keep is not None and not max(1, min_keep) <= keep <= E:
        raise ValueError(f"keep = {keep}; expected {max(1, min_keep)}..{E} (each token is "
                         f"routed to {min_keep} experts)")
    if keep_mass is not None and not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass = {keep_mass}; expected 0 < keep_mass <= 1")
    mask = torch.zeros((L, E), dtype=torch.bool)
    for l in moe_layers:
        order = torch.sort(hits[l].double(), descending=True, stable=True).indices
        if keep is not None:
            n = keep
        else:
            total = float(hits[l].sum())
            cum = torch.cumsum(hits[l].double()[order], 0)
            n = int((cum < keep_mass * total).sum()) + 1 if total > 0 else E
            n = min(max(n, 1, min_keep), E)
        mask[l, order[n:]] = True
    return mask


def random_like(mask: torch.Tensor, moe_layers, seed: int = 0) -> torch.Tensor:
    """A mask removing as many experts per layer as `mask`, chosen uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask)
    for l in moe_layers:
        n = int(mask[l].sum())
        out[l, torch.randperm(mask.shape[1], generator=g)[:n]] = True
    return out


def save_mask(path: str | Path, mask: torch.Tensor, **meta) -> Path:
    path = Path(path)
    L, E = mask.shape
    removed = {str(l): torch.nonzero(mask[l]).flatten().tolist() for l in range(L) if mask[l].any()}
    path.write_text(json.dumps({"format": MASK_FORMAT, "layers": L, "experts": E,
                                "removed": removed, **meta}, indent=1) + "\n")
    return path


def load_mask(path: str | Path, num_layers: int | None = None,
              num_experts: int | None = None) -> torch.Tensor:
    """The bool [L, E] mask (True = removed) of a mask file written by save_mask."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"expert mask file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"expert mask file {path} is not JSON ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != MASK_FORMAT:
        raise ValueError(f"{path} is not an expert mask file (format {MASK_FORMAT!r})")
    try:
        L, E = int(obj["layers"]), int(obj["experts"])
        removed = {int(l): [int(e) for e in ids] for l, ids in obj["removed"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed expert mask file ({type(e).__name__}: {e}); expected "
                         f"'layers', 'experts' and 'removed' {{layer: [expert ids]}}") from None
    if (num_layers, num_experts) != (None, None) and (L, E) != (num_layers, num_experts):
        raise ValueError(f"{path} is for {L} layers x {E} experts; the model has "
                         f"{num_layers} x {num_experts}")
    mask = torch.zeros((L, E), dtype=torch.bool)
    for l, ids in removed.items():
        if not 0 <= l < L or any(not 0 <= e < E for e in ids):
            raise ValueError(f"{path}: layer {l} / expert ids {ids} out of range {L} x {E}")
        mask[l, ids] = True
    return mask


_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_GATE_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
INDEX_FILE = "model.safetensors.index.json"


def write_pruned_checkpoint(src: str | Path, dst: str | Path, mask: torch.Tensor) -> Path:
    """A copy of the Hugging Face checkpoint `src` without the experts `mask` removes ([L, E]
    bool, the same count in every MoE layer: the config has one n_routed_experts): their
    weights and router rows are dropped and the kept experts renumbered in id order. Reads
    and writes one safetensors file at a time; every other file is copied."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    L, E = mask.shape
    if (cfg["num_hidden_layers"], cfg["n_routed_experts"]) != (L, E):
        raise ValueError(f"mask is {L} x {E}; the checkpoint has {cfg['num_hidden_layers']} "
                         f"layers x {cfg['n_routed_experts']} experts")
    counts = {int(mask[l].sum()) for l in range(L) if mask[l].any()}
    if len(counts) > 1:
        raise ValueError(f"a smaller checkpoint needs the same number of experts removed in "
                         f"every MoE layer; the mask removes {sorted(counts)}")
    kept = {l: (~mask[l]).nonzero().flatten().tolist() for l in range(L)}
    n = E - (counts.pop() if counts else 0)
    if n < cfg["num_experts_per_tok"]:
        raise ValueError(f"{n} experts left per layer, fewer than top-k = "
                         f"{cfg['num_experts_per_tok']}")
    new_id = {l: {e: i for i, e in enumerate(ids)} for l, ids in kept.items()}
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.safetensors"))
    weight_map = {}
    for f in files:
        out = {}
        with safe_open(str(f), framework="pt") as r:
            for name in r.keys():
                m = _EXPERT_RE.match(name)
                g = _GATE_RE.match(name)
                if m:
                    l, e = int(m.group(1)), int(m.group(2))
                    if e in new_id[l]:
                        out[f"model.layers.{l}.mlp.experts.{new_id[l][e]}.{m.group(3)}"] = \
                            r.get_tensor(name)
                elif g:
                    out[name] = r.get_tensor(name)[kept[int(g.group(1))]].contiguous()
                else:
                    out[name] = r.get_tensor(name)
        save_file(out, str(dst / f.name), metadata={"format": "pt"})
        weight_map.update({k: f.name for k in out})
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, dst / f.name)
    if (src / INDEX_FILE).exists():
        idx = json.loads((src / INDEX_FILE).read_text())
        idx["weight_map"] = weight_map
        (dst / INDEX_FILE).write_text(json.dumps(idx, indent=1))
    cfg["n_routed_experts"] = n
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


@torch.no_grad()
def perplexity(model: Model, domains, *, expert_mask=None, max_len: int | None = None,
               max_samples: int | None = None, max_tokens: int | None = None,
               batch_tokens: int = 8192) -> dict[str, dict]:
    """Per domain: geometric-mean perplexity over samples (chunks of max_len tokens), samples
    and tokens, with `expert_mask` removed (mask_mode "reroute") or the full model (None)."""
    L = model.config.num_hidden_layers
    last = f"blocks.{L - 1}.hook_resid_post"
    kw = {} if expert_mask is None else dict(expert_mask=expert_mask, mask_mode="reroute")
    out = {}
    for dom in C.as_domains(domains):
        per_batch, tokens = [], 0   # (batch index, per-sample log perplexities)
        for b in _batches(model, dom, None, max_len=max_len, batch_tokens=batch_tokens,
                          split=None, max_samples=max_samples, max_tokens=max_tokens):
            cap = Capture(TapRequest([last]))
            model.forward(b.input_ids, attention_mask=b.attention_mask, capture=cap,
                          logits="last", **kw)
            nll, cnt = _sample_nll(model, b, cap[last])
            keep = cnt > 0
            per_batch.append((b.index, (nll[keep] / cnt[keep]).tolist()))
            tokens += int(cnt[keep].sum())
        # corpus parallel: every rank's samples in corpus order, summed as one process does
        logs = [x for part in distributed.in_order(per_batch) for x in part]
        tokens = distributed.sum_int(tokens)
        out[dom.name] = {"perplexity": math.exp(sum(logs) / len(logs)) if logs else float("nan"),
                         "samples": len(logs), "predicted_tokens": tokens}
    return out


def prune(model: Model, corpus, heldout, *, keep: int | None = None,
          keep_mass: float | None = None, seed: int = 0, max_len: int | None = None,
          max_samples: int | None = None, max_tokens: int | None = None,
          progress: bool = False) -> dict:
    moe = list(model.config.moe_layers)
    r = route_corpus(model, corpus, max_len=max_len, max_samples=max_samples,
                     max_tokens=max_tokens, progress=progress)
    hits = sum(torch.tensor(d["hits"], dtype=torch.int64) for d in r.domains.values())
    mask = choose_experts(hits, moe, keep=keep, keep_mass=keep_mass,
                          min_keep=model.config.num_experts_per_tok)
    rand = random_like(mask, moe, seed)
    ev = dict(max_len=max_len, max_samples=max_samples, max_tokens=max_tokens)
    full = perplexity(model, heldout, **ev)
    cal = perplexity(model, heldout, expert_mask=mask, **ev)
    rnd = perplexity(model, heldout, expert_mask=rand, **ev)
    E = model.config.n_routed_experts
    kept = {str(l): E - int(mask[l].sum()) for l in moe}
    covered = {str(l): float(hits[l][~mask[l]].sum()) / max(float(hits[l].sum()), 1.0)
               for l in moe}
    domains = {n: {"samples": full[n]["samples"], "predicted_tokens": full[n]["predicted_tokens"],
                   "full": full[n]["perplexity"], "calibrated": cal[n]["perplexity"],
                   "random": rnd[n]["perplexity"]} for n in full}
    return {"analysis": "prune", "keep": keep, "keep_mass": keep_mass, "seed": seed,
            "experts": E, "kept_per_layer": kept, "calibration_mass_kept": covered,
            "calibration_tokens": {n: d["tokens"] for n, d in r.domains.items()},
            "domains": domains, "mask": mask, "random_mask": rand}


def build_parser() -> argparse.ArgumentParser:
    head, body = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(prog="python -m moe_engine.prune", description=head,
                                 epilog=body, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    ap.add_argument("--corpus", action="append", required=True, metavar="[NAME=]PATH",
                    help="calibration domain (repeatable)")
    ap.add_argument("--heldout", action="append", required=True, metavar="[NAME=]PATH",
                    help="held-out domain to score (repeatable)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--keep", type=int, help="experts kept per MoE layer")
    g.add_argument("--keep-mass", type=float, help="fraction of routing hits the kept cover")
    ap.add_argument("--out", required=True, type=Path,
                    help="directory for the mask file, the report and (--checkpoint) the model")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="also write the smaller checkpoint to OUT/model (needs --keep)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device (default: %(default)s, cuda when a GPU is present)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="weight and activation dtype (default: %(default)s)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "emu"],
                    help="MoE kernels (default: %(default)s: cpu on the CPU, cuda on a GPU)")
    ap.add_argument("--max-len", type=int, help="tokens per sample (default 2048)")
    ap.add_argument("--max-samples", type=int, help="samples per domain (default: all)")
    ap.add_argument("--max-tokens", type=int, help="tokens per domain (default: all)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars on a terminal)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint and args.keep is None:
        print("error: --checkpoint needs --keep (one expert count for every layer)",
              file=sys.stderr)
        return 2
    try:
        distributed.init(args.device)   # under torchrun: the corpus is shared out, rank 0 writes
        model = Model.load(args.model, dtype=args.dtype, device=args.device,
                           backend=args.backend, progress=not args.no_progress)
        corpus = [C.domain_from_path(p) for p in args.corpus]
        heldout = [C.domain_from_path(p) for p in args.heldout]
        res = prune(model, corpus, heldout, keep=args.keep, keep_mass=args.keep_mass,
                    seed=args.seed, max_len=args.max_len, max_samples=args.max_samples,
                    max_tokens=args.max_tokens, progress=not args.no_progress and distributed.is_main())
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()
    if not distributed.is_main():
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {"keep": args.keep, "keep_mass": args.keep_mass, "model": str(model.path)}
    mask = res.pop("mask")
    save_mask(out / "mask.json", mask, **meta)
    if args.checkpoint:
        try:
            write_pruned_checkpoint(model.path, out / "model", mask)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    save_mask(out / "mask_random.json", res.pop("random_mask"), seed=args.seed, **meta)
    (out / "prune.json").write_text(json.dumps(res, indent=1) + "\n")
    from .lens.export import write_csv
    rows = [[n, d["samples"], d["predicted_tokens"], d["full"], d["calibrated"], d["random"]]
            for n, d in res["domains"].items()]
    write_csv(out / "prune", {"columns": ["domain", "samples", "predicted_tokens", "full",
                                          "calibrated", "random"], "rows": rows})
    kept = sorted(set(res["kept_per_layer"].values()))
    print(f"kept {kept[0]}..{kept[-1]} of {res['experts']} experts per layer")
    print(f"{'domain':12s} {'full':>10s} {'calibrated':>11s} {'random':>10s}")
    for n, d in res["domains"].items():
        print(f"{n:12s} {d['full']:10.3f} {d['calibrated']:11.3f} {d['random']:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
