"""Ablate one expert and measure how much the loss on a text changes. Finds the expert that
takes the most tokens of the text in one MoE layer, then removes it three ways: the kernel's
per-call mask ("zero": chosen as usual, contribution removed; "reroute": the next-best expert
takes its slot) and a function hook that zeroes its output at every token that chose it.

    python examples/ablate_expert.py [--model DIR] [--layer L] [--text TEXT]
"""
import argparse

import torch

import moe_engine
from moe_engine import Capture, Patch, TapRequest

TEXT = "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all."


def loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one sequence."""
    lp = torch.log_softmax(logits[0, :-1].float(), -1)
    return float(-lp.gather(1, ids[1:, None]).mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: the bundled small model)")
    ap.add_argument("--layer", type=int, help="MoE layer (default: the first)")
    ap.add_argument("--text", default=TEXT)
    args = ap.parse_args(argv)
    model = moe_engine.load(args.model, dtype="float32", progress=False)
    layer = model.config.moe_layers[0] if args.layer is None else args.layer
    ids = torch.tensor(model.tokenizer.encode(args.text))
    name = f"blocks.{layer}.moe.hook_topk_ids"
    cap = Capture(TapRequest([name]))
    base = loss(model.forward(ids, capture=cap), ids)
    chosen = cap[name]                                      # [N, k] expert ids per token
    expert = int(torch.bincount(chosen.reshape(-1)).argmax())
    n = int((chosen == expert).any(1).sum())
    print(f"layer {layer}: expert {expert} is chosen by {n} of {ids.numel()} tokens")
    print(f"loss, full model:               {base:.4f}")
    for mode in ("zero", "reroute"):
        l = loss(model.forward(ids, expert_mask={layer: [expert]}, mask_mode=mode), ids)
        print(f"loss, expert masked ({mode:7s}):  {l:.4f}  ({l - base:+.4f})")

    def drop(x, ctx):                                       # x [N, k, D]: unweighted outputs
        return torch.where((chosen == expert).unsqueeze(-1), torch.zeros_like(x), x)
    hooked = loss(model.forward(ids, capture=Capture(patches=[
        Patch(f"blocks.{layer}.moe.hook_expert_out", drop)])), ids)
    print(f"loss, output zeroed by a hook:  {hooked:.4f}  ({hooked - base:+.4f})")


if __name__ == "__main__":
    main()
