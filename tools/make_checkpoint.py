"""Write a random-weight DeepSeekMoE checkpoint (HF layout) of a preset shape; see
src/moe_engine/synthetic.py for the layout, init scales and tokenizer.

  python tools/make_checkpoint.py OUT_DIR --preset tiny|bench-small|16b-layer|16b [--layers N]
      [--shards N] [--seed S] [--dtype bfloat16|float32] [--set key=value ...]

`--set` overrides config.json fields; values are parsed as JSON when they parse
(`--set tie_word_embeddings=true --set rope_scaling='{"type":"linear","factor":2}'`), else kept
as strings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a source checkout

from moe_engine.synthetic import PRESETS, make_checkpoint  # noqa: E402


def _key_value(s: str) -> tuple[str, object]:
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {s!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--preset", choices=list(PRESETS), required=True)
    ap.add_argument("--layers", type=int, help="num_hidden_layers (default: the preset's)")
    ap.add_argument("--shards", type=int, help="default 1 (16b: 7, as published)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.json field (repeatable)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out = make_checkpoint(args.out_dir, args.preset, layers=args.layers, seed=args.seed,
                          shards=args.shards, dtype=args.dtype, overrides=dict(args.set))
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
