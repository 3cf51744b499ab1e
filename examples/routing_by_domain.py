"""Which experts does each domain use? Routes a few sentences per domain through the bundled
model (or --model DIR) and prints, per MoE layer, the experts that take the largest share of
each domain's tokens, next to the uniform share k/E.

    python examples/routing_by_domain.py [--model DIR] [--layer L] [--out DIR]
"""
import argparse

import moe_engine
from moe_engine import lens

DOMAINS = {
    "english": ["The old house stood at the end of the lane, its windows dark and quiet.",
                "She opened the letter slowly and read it twice before she understood."],
    "french": ["Le petit village se trouve au bord de la rivière, entouré de collines.",
               "Nous avons mangé du pain frais et du fromage avant de partir."],
    "math": ["Tom has 12 apples and gives 5 to Anna. How many apples does Tom have left?",
             "A train travels 60 miles in 1.5 hours. What is its average speed?"],
    "code": ["def mean(xs):\n    return sum(xs) / len(xs)\n",
             "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n"],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    ap.add_argument("--layer", type=int, help="MoE layer to print (default: every one)")
    ap.add_argument("--out", help="also write routing.json/.csv and the plots here")
    args = ap.parse_args(argv)
    model = moe_engine.load(args.model, dtype="float32", progress=False)
    res = lens.route_corpus(model, DOMAINS, progress=False).to_json()
    layers = [str(args.layer)] if args.layer is not None else [str(l) for l in res["model"]["moe_layers"]]
    for l in layers:
        print(f"layer {l} (uniform share {res['uniform_percent'][l]:.1f}% of tokens per expert)")
        for name, d in res["domains"].items():
            top = d["layers"][l]["top_experts"][:4]
            pct = d["layers"][l]["percent"]
            print(f"  {name:8s} {d['tokens']:4d} tokens: "
                  + ", ".join(f"e{e} {pct[e]:.0f}%" for e in top))
    if args.out:
        from pathlib import Path
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(__import__("json").dumps(res))
        lens.write_csv(out / "routing", res)
        lens.plot_routing(res, out)


if __name__ == "__main__":
    main()
