"""Which experts made the model predict its next token? Attributes the logit of the model's
top prediction at the last position to every (layer, token, expert) output by gradient x
activation (the torch backend's autograd), and checks the largest one by ablating it.

    python examples/attribute_last_token.py [--model DIR] [--text TEXT] [--top N]
"""
import argparse

import torch

import moe_engine
from moe_engine import lens

TEXT = "def add(a, b):\n    return a +"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    model = moe_engine.load(args.model, dtype="float32", progress=False)
    tok = model.tokenizer
    ids = torch.tensor(tok.encode(args.text))
    target = int(model.forward(ids, logits="last")[0, :tok.vocab_size].argmax())
    print(f"next token after {args.text[-20:]!r}: {lens.token_text(tok, target)!r}")
    att = lens.attribute_experts(model, ids, target=target)
    rows = []
    for l, ex, w, s in zip(att.layers, att.ids, att.weights, att.scores):
        for t in range(s.shape[0]):
            for j in range(s.shape[1]):
                rows.append((float(s[t, j]), l, t, j, int(ex[t, j]), float(w[t, j])))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"target logit {att.target:.3f}; largest contributions (gradient x activation):")
    for s, l, t, j, e, w in rows[:args.top]:
        print(f"  layer {l} token {t:2d} {lens.token_text(tok, int(ids[t]))!r:12s} "
              f"expert {e:3d} (weight {w:.2f}): {s:+.4f}")
    s, l, t, j, e, w = rows[0]
    one = lens.attribute_experts(model, ids, target=target, method="ablation", layers=[l])
    print(f"zero-ablating layer {l} token {t} expert {e} changes the logit by "
          f"{-float(one.scores[0][t, j]):+.4f} (gradient x activation said {-s:+.4f})")


if __name__ == "__main__":
    main()
