"""Text generation: sampling, the prefill/decode loop with streaming, and the CLI.

    python -m moe_engine.generate [--model DIR] --prompt "..." [--topk K] [--expert-mask L:E,E;...]
        [--mask-mode reroute|zero] [--device cpu|cuda] [--dtype bfloat16|float32]
        [--backend auto|torch|cpu|cuda|emu] [--max-new-tokens N] [--temperature T] [--top-p P]
        [--top-k N] [--seed S] [--stop STR] [--chat]

Shape legend: B sequences, P prompt length (left-padded), V vocab.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .interventions import Interventions, for_call
from .model import Model, left_pad
from .quant import add_quant_arguments, quant_kwargs
from .taps import Capture


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = no top-k filter
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature = {self.temperature}; expected >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p = {self.top_p}; expected 0 < top_p <= 1")
        if self.top_k < 0:
            raise ValueError(f"top_k = {self.top_k}; expected >= 0 (0 = off)")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]. Greedy picks the lowest id among equal maxima."""
    if params.temperature == 0:
        return logits.argmax(-1)
    x = logits / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, -torch.inf)
    if params.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_x, -1) >= params.top_p  # keep the smallest set reaching p
        sorted_x = sorted_x.masked_fill(drop, -torch.inf)
        x = torch.full_like(x, -torch.inf).scatter(-1, order, sorted_x)
    probs = torch.softmax(x, -1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu"
                             else probs, 1, generator=generator).squeeze(1).to(logits.device)


@dataclass
class TokenEvent:
    seq: int          # which prompt
    token_id: int
    text: str         # text completed by this token (may be "" while a character is incomplete)
    finished: bool = False
    reason: str | None = None   # "eos", "stop", "length"


@dataclass
class Completion:
    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    reason: str | None = None


def iter_generate(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
                  max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
                  stop: Sequence[str] = (), chat: bool = False,
                  interventions: Interventions | None = None, capture: Capture | None = None,
                  usage: torch.Tensor | None = None, backend: str | None = None,
                  **intervention_kwargs) -> Iterator[TokenEvent]:
    """Prefill all prompts as one left-padded batch, then decode one token per step for every
    unfinished sequence, yielding TokenEvents as they come. Stops at EOS, at a stop string (the
    stop string is not emitted), or after max_new_tokens."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"the model at {model.path} has no tokenizer.json; pass token ids instead")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}; expected >= 1")
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    interventions = for_call(interventions, intervention_kwargs)  # once: every step runs the same
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            text = tok.chat_prompt([{"role": "user", "content": p}]) if chat else p
            encoded.append(tok.encode(text))  # a chat prompt already starts with BOS; encode never doubles it
        else:
            encoded.append([int(i) for i in p])
    for i, e in enumerate(encoded):
        if len(e) == 0:
            raise ValueError(f"prompt {i} encodes to no tokens")
    ctx = model.config.max_position_embeddings
    longest = max(map(len, encoded))
    if longest + max_new_tokens > ctx:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context of {ctx} tokens")

    B, P = len(encoded), longest
    dev = model.device
    ids, mask = left_pad(encoded, dev)
    cache = model.new_cache(B, P + max_new_tokens)
    gen = None
    if sampling.seed is not None:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(sampling.seed)
    vocab = tok.vocab_size
    streams = [tok.stream_decoder() for _ in range(B)]
    pending = [""] * B           # text held back because it may start a stop string
    finished = [False] * B
    eos = tok.eos_id
    kw = dict(interventions=interventions, capture=capture, usage=usage, backend=backend, logits="last")

    logits = model.forward(ids, attention_mask=mask, cache=cache, step=0, **kw)
    for step in range(1, max_new_tokens + 1):
        if logits.shape[-1] > vocab:  # rows past the tokenizer belong to no token
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=dev) >= vocab, -torch.inf)
        nxt = sample(logits, sampling, gen)
        for i in range(B):
            if finished[i]:
                continue
            t = int(nxt[i])
            if t == eos:
                finished[i] = True
                yield TokenEvent(i, t, pending[i] + streams[i].flush(), True, "eos")
                continue
            text = pending[i] + streams[i].push(t)
            cut = _find_stop(text, stop)
            if cut is not None:
                finished[i] = True
                yield TokenEvent(i, t, text[:cut], True, "stop")
                continue
            hold = _stop_prefix_len(text, stop)
            pending[i] = text[len(text) - hold:] if hold else ""
            last = step == max_new_tokens
            if last:
                finished[i] = True
                yield TokenEvent(i, t, text + streams[i].flush(), True, "length")
            else:
                yield TokenEvent(i, t, text[:len(text) - hold])
        if all(finished):
            break
        feed = torch.where(torch.tensor(finished, device=dev), torch.full_like(nxt, eos), nxt)
        logits = model.forward(feed.unsqueeze(1), cache=cache, step=step, **kw)


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


def generate(model: Model, prompts, **kwargs) -> list[Completion]:
    """Collect iter_generate into one Completion per prompt."""
    single = isinstance(prompts, str)
    plist = [prompts] if single else list(prompts)
    out = [Completion(p if isinstance(p, str) else "") for p in plist]
    for ev in iter_generate(model, plist, **kwargs):
        c = out[ev.seq]
        c.text += ev.text
        if ev.reason != "eos":
            c.token_ids.append(ev.token_id)
        if ev.finished:
            c.reason = ev.reason
    return out


# -- CLI ---------------------------------------------------------------------------------------

def parse_expert_mask(spec: str, num_layers: int) -> dict[int, list[int]]:
    """'1:0,3;2:5' -> {1: [0, 3], 2: [5]}; '*:0,1' masks experts 0 and 1 in every layer."""
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        if ":" not in part:
            raise ValueError(f"--expert-mask part {part!r}: expected LAYER:ID[,ID...] or *:ID[,ID...]")
        layer, ids = part.split(":", 1)
        try:
            experts = [int(e) for e in ids.split(",") if e.strip()]
            layers = range(num_layers) if layer.strip() == "*" else [int(layer)]
        except ValueError:
            raise ValueError(f"--expert-mask part {part!r}: layers and expert ids must be integers") from None
        for l in layers:
            out.setdefault(l, []).extend(experts)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moe_engine.generate",
                                 description="Stream text from a DeepSeekMoE checkpoint.")
    ap.add_argument("--model", help="Hugging Face checkpoint directory (default: the bundled small model)")
    ap.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: a sample prompt)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat format")
    ap.add_argument("--topk", type=int, help="experts per token in every MoE layer (0..E; default: the model's)")
    ap.add_argument("--expert-mask", help="experts to remove, e.g. '1:0,3;2:5' or '*:7'")
    ap.add_argument("--mask-mode", default="reroute", choices=["reroute", "zero"])
    ap.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=None,
                    help="renormalise the top-k weights (default: the model's norm_topk_prob)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "emu"])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch and the kernels")
    add_quant_arguments(ap)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = Model.load(args.model, dtype=args.dtype, device=args.device, backend=args.backend,
                           progress=sys.stderr.isatty(), **quant_kwargs(args))
        mask = parse_expert_mask(args.expert_mask, model.config.num_hidden_layers) if args.expert_mask else None
        prompts = args.prompt or ["The"]
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
        t0 = time.perf_counter()
        n_tokens = 0
        first = None
        many = len(prompts) > 1
        for ev in iter_generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                stop=args.stop, chat=args.chat, topk=args.topk, expert_mask=mask,
                                mask_mode=args.mask_mode, renormalize=args.renormalize):
            if first is None:
                first = time.perf_counter()
            n_tokens += ev.reason != "eos"
            text = f"[{ev.seq}] {ev.text}\n" if many else ev.text
            sys.stdout.write(text)
            sys.stdout.flush()
        dt = time.perf_counter() - t0
        decode_dt = time.perf_counter() - (first or t0)
        rate = (n_tokens - len(prompts)) / decode_dt if n_tokens > len(prompts) and decode_dt > 0 else float("nan")
        print(f"\n[{n_tokens} tokens in {dt:.2f} s; decode {rate:.1f} tok/s; backend {model.backend}; "
              f"{model.path}]", file=sys.stderr)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
