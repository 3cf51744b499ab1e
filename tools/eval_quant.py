"""Quality of the quantized bundled model: held-out perplexity per domain at bf16 weights, 8-bit
and 4-bit (each group size), and top-1 token agreement with the bf16 weights.

Runs the engine itself (moe_engine.Model, torch backend, fp32 compute) so the only difference
between rows is the weights: "bf16" is the saved checkpoint, the others are the same checkpoint
quantized on load (`load(quant=..., group_size=..., sym=..., quant_lm_head=...)`, round to
nearest, the bits that `python -m moe_engine.quantize` writes; "+ int8 lm_head": the lm_head too,
at 8 bits). Perplexity is tools/eval_small.py's measure (held-out
documents cut into chunks of <= --chunk tokens, per-chunk mean NLL, domain score exp(mean over
chunks)); top-1 agreement is the fraction of scored positions whose argmax logit is the same
token as with the bf16 weights.

Results go to eval.json under "quantization" and into MODEL_CARD.md (tools/eval_small.py's
write_card renders them), so `python tools/eval_small.py --card-only` keeps the table.

    python tools/eval_quant.py --model src/moe_engine/assets/small --corpus out/corpus
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "src"))
from build_corpus import DOMAINS  # noqa: E402
from eval_small import write_card  # noqa: E402
from train_small import EOS, encode_domain, heldout_chunks  # noqa: E402

import moe_engine  # noqa: E402
from moe_engine.model import left_pad  # noqa: E402

# (label, quant, group_size, sym, quant_lm_head); None = the saved bf16 weights
VARIANTS = [("bf16", None, None, None, False), ("int8 g128", "int8", 128, False, False),
            ("int4 g32", "int4", 32, False, False), ("int4 g64", "int4", 64, False, False),
            ("int4 g128", "int4", 128, False, False), ("int4 g128 sym", "int4", 128, True, False),
            ("int4 g128 + int8 lm_head", "int4", 128, False, True)]


@torch.no_grad()
def score(model, chunks, batch: int):
    """(per-chunk mean NLL list, argmax token of every scored position, in chunk order)."""
    nll, top1 = [], []
    for i in range(0, len(chunks), batch):
        group = chunks[i:i + batch]
        ids, mask = left_pad([c[:-1] for c in group])
        logits = model.forward(ids, attention_mask=mask)                       # [B, Q, V] fp32
        tgt, _ = left_pad([c[1:] for c in group])
        ce = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")   # [B, Q]
        for j, c in enumerate(group):
            n = len(c) - 1
            nll.append(float(ce[j, -n:].mean()))
            top1.append(logits[j, -n:].argmax(-1))
    return nll, torch.cat(top1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "src/moe_engine/assets/small")
    ap.add_argument("--corpus", type=Path, default=Path("out/corpus"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-card", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    chunks = {d: heldout_chunks(encode_domain(tok, args.corpus, d, "heldout", eos), args.chunk) for d in DOMAINS}
    res = {"chunk_tokens": args.chunk, "compute": "fp32 on the torch backend",
           "ppl": {}, "top1_agreement": {}, "weight_bytes": {}}
    ref_top1 = {}
    for label, quant, g, sym, head in VARIANTS:
        t0 = time.time()
        kw = {} if quant is None else {"quant": quant, "group_size": g, "sym": sym, "quant_lm_head": head}
        model = moe_engine.load(args.model, dtype="float32", backend="torch", progress=False, **kw)
        res["ppl"][label], res["top1_agreement"][label] = {}, {}
        for d in DOMAINS:
            nll, top1 = score(model, chunks[d], args.batch)
            res["ppl"][label][d] = round(math.exp(float(np.mean(nll))), 3)
            if quant is None:
                ref_top1[d] = top1
            res["top1_agreement"][label][d] = round(float((top1 == ref_top1[d]).float().mean()), 5)
        print(f"[eval_quant] {label}: {res['ppl'][label]} agreement {res['top1_agreement'][label]} "
              f"({time.time() - t0:.0f}s)", file=sys.stderr)
    res["command"] = "python tools/eval_quant.py " + " ".join(argv if argv is not None else sys.argv[1:])
    eval_path = args.model / "eval.json"
    full = json.loads(eval_path.read_text())
    full["quantization"] = res
    eval_path.write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n")
    if not args.no_card:
        for key in ("perplexity", "perplexity_token_weighted", "perplexity_bf16", "perplexity_train_sample"):
            for d, v in full.get(key, {}).items():
                full[key][d] = {int(k): x for k, x in v.items()}
        write_card(args.model, full, full["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
