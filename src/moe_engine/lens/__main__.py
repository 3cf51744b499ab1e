"""python -m moe_engine.lens SUB [--model DIR] --out DIR [options] PATH...

Sub-commands (docs/lens.md; one domain per PATH, labelled by its name or NAME=PATH):
    routing       % of tokens per expert per layer per domain   routing.json, routing_layerNN.png
    early-decode  logit lens per layer, a prompt per domain     early_decode.json, a PNG per prompt
    topk-sweep    per-sample perplexity (geometric mean) vs k   topk_sweep.json, topk_sweep.png
    similarity    cos(H^{l_1}, H^{l_K}) per layer per domain    similarity.json, similarity.png
    router-stats  router entropy, mean router probability      router_stats.json, .png
    coactivation  which experts fire together (pair lift)       coactivation.json, _layerNN.png
    vocab         tokens most routed to each expert             vocab.json, vocab_layerNN.png
    capture       taps of a whole corpus to safetensors shards  shard-NNNNN.safetensors, index.json
Every JSON is also written as long-format CSV beside it.

Under `torchrun --nproc-per-node N` the corpus's batches are shared out to the N processes and
rank 0 writes the same files one process would (capture runs in one process); with
--expert-parallel the processes split the experts instead (src/moe_engine/distributed.py).

With no --model the bundled small model is used. --preset paper applies the public MoE Lens
code's definitions, --preset paper-as-run also its two defects (so its figures reproduce); the
default, notes, is ours. docs/lens.md has the formulas of each.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import distributed
from ..model import Model, set_threads
from ..quant import add_quant_arguments, quant_kwargs
from . import analyses
from . import plots as P
from .corpus import SPLITS, Domain, domain_from_path
from .export import write_csv
from .files import check_out_dir, write_text

SUBCOMMANDS = ("routing", "early-decode", "topk-sweep", "similarity", "router-stats",
               "coactivation", "vocab", "capture")


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    head, body = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(prog="python -m moe_engine.lens", description=head, epilog=body,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="SUB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("paths", nargs="*", metavar="PATH",
                        help="file or directory per domain (NAME=PATH to label)")
    common.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    common.add_argument("--out", required=True, type=Path,
                        help="directory for the JSON and PNG results")
    common.add_argument("--preset", default="notes", choices=sorted(analyses.PRESETS))
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    common.add_argument("--backend", default="auto",
                        choices=["auto", "torch", "cpu", "cuda", "emu"])
    common.add_argument("--no-cuda-graph", action="store_true",
                        help="run decode steps op by op instead of replaying a captured CUDA graph "
                             "(default: graphs on with the cuda backend)")
    common.add_argument("--max-len", type=int, default=None,
                        help="tokens per sample (default 2048, routing under the paper presets"
                             " 4096; capped by the model's context)")
    common.add_argument("--batch-tokens", type=int, default=analyses.BATCH_TOKENS,
                        help="padded tokens per forward call")
    common.add_argument("--split", default=None, choices=SPLITS,
                        help="documents of a plain-text file (default: the preset's: notes "
                             "file, paper line)")
    common.add_argument("--renormalize", default="model", choices=["model", "on", "off"],
                        help="divide the top-k weights by their sum (default: the model's own)")
    common.add_argument("--expert-mask-file", type=Path,
                        help="experts to remove, a mask file of python -m moe_engine.prune")
    common.add_argument("--mask-mode", default="reroute", choices=["reroute", "zero"],
                        help="how --expert-mask-file removes experts (default reroute)")
    common.add_argument("--max-samples", type=int, help="samples per domain (default: all)")
    common.add_argument("--max-tokens", type=int, help="tokens per domain (default: all)")
    common.add_argument("--threads", type=int, help="CPU threads")
    common.add_argument("--allow-nonfinite", action="store_true",
                        help="load weights holding NaN/Inf (refused by default)")
    common.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: bars when stderr is a terminal)")
    common.add_argument("--expert-parallel", action="store_true",
                        help="under torchrun: each process holds 1/N of every MoE layer's experts "
                             "(default: each holds the whole model and runs 1/N of the corpus)")
    add_quant_arguments(common)
    p = sub.add_parser("routing", parents=[common], help="routing distribution per domain")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    p.add_argument("--plot-layers", type=_int_list,
                   help="layers to draw bar plots for (default: all MoE layers)")
    p = sub.add_parser("early-decode", parents=[common],
                       help="logit lens of layer outputs and H^{l_k}")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt (repeatable); else each PATH's first sample")
    p.add_argument("--prompt-tokens", type=int, default=32,
                   help="tokens of each PATH's first sample to use")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--norm", choices=["final", "none"], help="default: the preset's")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    p = sub.add_parser("topk-sweep", parents=[common], help="perplexity vs top-k")
    p.add_argument("--ks", type=_int_list, help="values of k (default 1..K)")
    p = sub.add_parser("similarity", parents=[common], help="single vs ensemble cosine similarity")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    _add_stats_parsers(sub, common)
    p = sub.add_parser("capture", parents=[common],
                       help="stream a corpus's taps to safetensors shards (resumable)")
    p.add_argument("--taps", action="append", required=True, metavar="PATTERN",
                   help="tap names or fnmatch patterns (repeatable)")
    p.add_argument("--positions", default="all", choices=["all", "last"])
    p.add_argument("--shard-mb", type=int, default=256, help="MB of taps per shard")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    return ap


def _finite(obj):
    """NaN/Inf (e.g. a perplexity over no tokens) become null: bare NaN is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> Path:
    """Written whole or not at all (lens/files.py)."""
    return write_text(path, json.dumps(_finite(obj), indent=1, ensure_ascii=False, allow_nan=False) + "\n")


def _check_args(args) -> None:
    """Flag values argparse's types cannot check, each refused before anything loads."""
    for flag, v, lo in (("--max-samples", args.max_samples, 1), ("--max-tokens", args.max_tokens, 2),
                        ("--max-len", args.max_len, 2), ("--batch-tokens", args.batch_tokens, 1),
                        ("--top", getattr(args, "top", None), 1),
                        ("--prompt-tokens", getattr(args, "prompt_tokens", None), 2),
                        ("--topk", getattr(args, "topk", None), 0)):
        if v is not None and v < lo:
            raise ValueError(f"{flag} {v}: expected an integer >= {lo}")
    for flag, vs in (("--ks", getattr(args, "ks", None)), ("--plot-layers", getattr(args, "plot_layers", None))):
        if vs is not None and (not vs or min(vs) < 0):
            raise ValueError(f"{flag} {','.join(map(str, vs))}: expected non-negative integers")


def _check_model_args(args, model: Model) -> None:
    """Flags that depend on the model, checked after loading and before the analysis."""
    c = model.config
    layers = getattr(args, "plot_layers", None)
    if layers:
        bad = [l for l in layers if l not in c.moe_layers]
        if bad:
            raise ValueError(f"--plot-layers {bad[0]}: not an MoE layer of this model; expected some of "
                             f"{list(c.moe_layers)}")
    for flag, vs in (("--topk", [getattr(args, "topk", None)]), ("--ks", getattr(args, "ks", None) or [])):
        bad = [k for k in vs if k is not None and k > c.n_routed_experts]
        if bad:
            raise ValueError(f"{flag} {bad[0]}: expected 0..{c.n_routed_experts} (the model's routed experts)")


def run(args) -> list[Path]:
    _check_args(args)
    if args.threads is not None:
        set_threads(args.threads)
    if not args.paths and not (args.command == "early-decode" and args.prompt):
        raise ValueError(f"{args.command}: give at least one corpus PATH")
    domains = [domain_from_path(p) for p in args.paths]
    out: Path = args.out
    distributed.init(args.device, expert_parallel=args.expert_parallel)
    if args.command == "capture" and distributed.world() > 1:
        raise ValueError("capture runs in one process (its shards are written as the batches "
                         "come); run it without torchrun")
    if distributed.is_main():
        check_out_dir(out, "--out")  # before any analysis runs
    # bars only for a person watching, and from one process
    progress = not args.no_progress and sys.stderr.isatty() and distributed.is_main()
    model = Model.load(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                       progress=progress, allow_nonfinite=args.allow_nonfinite,
                       expert_parallel=args.expert_parallel,
                       cuda_graph=False if args.no_cuda_graph else None, **quant_kwargs(args))
    _check_model_args(args, model)
    corpus_kw = dict(max_len=args.max_len, batch_tokens=args.batch_tokens, split=args.split,
                     max_samples=args.max_samples, max_tokens=args.max_tokens, progress=progress)
    renorm = {"model": None, "on": True, "off": False}[args.renormalize]
    mask_kw = {}
    if args.expert_mask_file is not None:
        if args.command == "topk-sweep":
            raise ValueError("topk-sweep takes no expert mask (it overrides k only)")
        from ..prune import load_mask
        c = model.config
        mask_kw = dict(expert_mask=load_mask(args.expert_mask_file, c.num_hidden_layers,
                                             c.n_routed_experts), mask_mode=args.mask_mode)
    files: list[Path] = []
    if args.command == "routing":
        res = analyses.route_corpus(model, domains, preset=args.preset, topk=args.topk,
                             renormalize=renorm, **mask_kw, **corpus_kw).to_json()
        if not distributed.is_main():   # every rank holds the result; rank 0 writes it
            return []
        files.append(_write_json(out / "routing.json", res))
        files += write_csv(out / "routing", res)
        files += P.plot_routing(res, out, layers=args.plot_layers)
    elif args.command == "early-decode":
        prompts: list[tuple[str, str | list[int]]] = [(f"prompt{i}", t)
                                                      for i, t in enumerate(args.prompt)]
        for d in domains:
            prompts.append((d.name, _first_prompt(model, d, args)))
        results = []
        for name, prompt in prompts:
            r = analyses.early_decode(model, prompt, top=args.top, preset=args.preset, norm=args.norm,
                               label=name, topk=args.topk, renormalize=renorm,
                               **mask_kw).to_json()
            results.append(r)
            if distributed.is_main():
                files.append(P.plot_early_decode(r, out / f"early_decode_{_safe(name)}.png"))
        if not distributed.is_main():
            return []
        summary = {"analysis": "early-decode", "results": results}
        files[:0] = [_write_json(out / "early_decode.json", summary),
                     *write_csv(out / "early_decode", summary)]
    elif args.command == "topk-sweep":
        res = analyses.topk_sweep(model, domains, ks=args.ks, preset=args.preset, renormalize=renorm,
                           **corpus_kw).to_json()
        if not distributed.is_main():
            return []
        files.append(_write_json(out / "topk_sweep.json", res))
        files += write_csv(out / "topk_sweep", res)
        files.append(P.plot_topk_sweep(res, out / "topk_sweep.png"))
    elif args.command == "similarity":
        res = analyses.similarity(model, domains, preset=args.preset, topk=args.topk,
                           renormalize=renorm, **mask_kw, **corpus_kw).to_json()
        if not distributed.is_main():
            return []
        files.append(_write_json(out / "similarity.json", res))
        files += write_csv(out / "similarity", res)
        files.append(P.plot_similarity(res, out / "similarity.png"))
    elif args.command == "capture":
        from .capture import capture_corpus
        kw = {k: v for k, v in corpus_kw.items() if k != "progress"}
        idx = capture_corpus(model, domains, args.taps, out, positions=args.positions,
                             shard_bytes=args.shard_mb << 20, preset=args.preset,
                             progress=progress, topk=args.topk, renormalize=renorm,
                             **mask_kw, **kw)
        files += [idx, *sorted(out.glob("shard-*.safetensors"))]
    elif args.command in STATS_COMMANDS:
        files += _run_stats(args, model, domains, out, corpus_kw, renorm, mask_kw)
    return files


def _first_prompt(model: Model, d: Domain, args) -> list[int]:
    from .corpus import iter_samples
    split = analyses.get_preset(args.preset).split if args.split is None else args.split
    for s in iter_samples(d, model.tokenizer, args.prompt_tokens, split=split):
        return s
    raise ValueError(f"domain {d.name!r} has no text to decode")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---- routing statistics (lens/stats.py): router-stats, coactivation, vocab -----------------------

STATS_COMMANDS = ("router-stats", "coactivation", "vocab")


def _add_stats_parsers(sub, common) -> None:
    p = sub.add_parser("router-stats", parents=[common],
                       help="router entropy and mean router probability per layer")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    p = sub.add_parser("coactivation", parents=[common], help="which experts fire together")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    p.add_argument("--plot-layers", type=_int_list,
                   help="layers to draw (default: all MoE layers)")
    p = sub.add_parser("vocab", parents=[common], help="tokens most routed to each expert")
    p.add_argument("--topk", type=int, help="override k on every MoE layer")
    p.add_argument("--top", type=int, default=10, help="tokens per expert")
    p.add_argument("--layers", type=_int_list, help="MoE layers to count (default: all)")


def _run_stats(args, model, domains, out: Path, corpus_kw: dict, renorm,
               mask_kw: dict) -> list[Path]:
    from . import stats
    kw = dict(preset=args.preset, topk=args.topk, renormalize=renorm, **mask_kw, **corpus_kw)
    if args.command == "router-stats":
        res = stats.router_stats(model, domains, **kw).to_json()
        stem, plots = "router_stats", lambda r: [P.plot_router_stats(r, out / "router_stats.png")]
    elif args.command == "coactivation":
        res = stats.coactivation(model, domains, **kw).to_json()
        stem, plots = "coactivation", lambda r: P.plot_coactivation(r, out, args.plot_layers)
    else:
        res = stats.vocab(model, domains, top=args.top, layers=args.layers, **kw).to_json()
        stem, plots = "vocab", lambda r: P.plot_vocab(r, out)
    if not distributed.is_main():
        return []
    return [_write_json(out / f"{stem}.json", res), *write_csv(out / stem, res), *plots(res)]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        files = run(args)
    except (ValueError, TypeError, LookupError, OSError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.finish()
    if not distributed.is_main():
        return 0
    for f in files:
        print(f)
    dt = time.perf_counter() - t0
    print(f"[{args.command}: {len(files)} files in {args.out} in {dt:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

