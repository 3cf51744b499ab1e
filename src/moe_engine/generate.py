"""Text generation: sampling, the prefill/decode loop with streaming, and the CLI.

    python -m moe_engine.generate [--model DIR] --prompt "..." [--moe-topk K] [--expert-mask L:E,E;...]
        [--expert-mask-file mask.json]
        [--temperature T] [--top-p P] [--top-k N] [--seed S] [--stop STR] [--chat] [--stream] [--echo]
    (python -m moe_engine.generate --help lists every flag with its default)

The API follows the tools users know: `generate(model, prompts, SamplingParams(...))` as in vLLM,
or the same sampling fields as plain keywords as in transformers (`temperature=`, `top_p=`,
`top_k=`, `seed=`, `max_new_tokens=`, `stop=`, `n=`, `logprobs=`), beside the interventions
(`topk=`, `expert_mask=`, ...). A prompt is text, a list of token ids, or a chat conversation (a
list of {"role", "content"} dicts, formatted with the chat template).

Every sequence samples from its own generator, seeded from its request's seed, so a request's
text does not depend on the other requests of its batch.

Shape legend: B sequences, P prompt length (left-padded), V vocab.
"""
from __future__ import annotations

import argparse
import errno
import math
import numbers
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from . import distributed
from .interventions import Interventions, for_call
from .interventions import _FIELDS as INTERVENTION_KEYS
from .model import Model, check_device, left_pad
from .quant import add_quant_arguments, quant_kwargs
from .taps import Capture

_SEED_MAX = 2 ** 64 - 1  # torch.Generator.manual_seed takes any 64-bit unsigned value


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or Inf logits: generation stops instead of sampling from them."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled (vLLM's SamplingParams; `max_new_tokens` is its `max_tokens`).

    temperature 0 = greedy; top_p nucleus; top_k 0 = off; seed None = torch's global generator;
    stop: one string or several (generation ends before the first one, which is not emitted);
    n: completions per prompt; logprobs: None, or N >= 0 to return the chosen token's
    log-probability and the N most likely tokens at every step (the model's distribution,
    before temperature and filtering)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 64
    stop: str | Sequence[str] | None = ()
    n: int = 1
    logprobs: int | None = None

    def __post_init__(self):
        def need(ok: bool, name: str, expected: str, exc=ValueError):
            if not ok:
                raise exc(f"{name} = {getattr(self, name)!r}; expected {expected}")

        need(_is_real(self.temperature), "temperature", "a number (0 = greedy)", TypeError)
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
             "a finite number >= 0 (0 = greedy)")
        need(_is_real(self.top_p), "top_p", "a number in (0, 1]", TypeError)
        need(0 < self.top_p <= 1, "top_p", "0 < top_p <= 1")
        need(_is_int(self.top_k), "top_k", "an int (0 = off)", TypeError)
        need(self.top_k >= 0, "top_k", ">= 0 (0 = off)")
        need(self.seed is None or _is_int(self.seed), "seed", "None or an int", TypeError)
        need(self.seed is None or 0 <= self.seed <= _SEED_MAX, "seed", f"None or an int in 0..{_SEED_MAX}")
        need(_is_int(self.max_new_tokens), "max_new_tokens", "an int >= 1", TypeError)
        need(self.max_new_tokens >= 1, "max_new_tokens", "an int >= 1")
        need(_is_int(self.n), "n", "an int >= 1 (completions per prompt)", TypeError)
        need(self.n >= 1, "n", "an int >= 1 (completions per prompt)")
        need(self.logprobs is None or _is_int(self.logprobs), "logprobs", "None or an int >= 0", TypeError)
        need(self.logprobs is None or self.logprobs >= 0, "logprobs", "None or an int >= 0")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)  # one stop string, never its characters
        elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
            stop = tuple(stop)
        else:
            need(False, "stop", "a string, a sequence of strings, or None", TypeError)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]. Greedy picks the lowest id among equal maxima.
    One generator draws for all B rows in order; generation gives each sequence its own."""
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
    seq: int          # which sequence: prompt_index * n + index (one per prompt when n = 1)
    token_id: int
    text: str         # text completed by this token (may be "" while a character is incomplete)
    finished: bool = False
    reason: str | None = None   # "eos", "stop", "length"
    logprob: float | None = None                       # with logprobs=N: the chosen token's
    top_logprobs: list[tuple[int, float]] | None = None  # with logprobs=N: the N most likely


@dataclass
class Completion:
    """One generated sequence. `prompt` is the prompt as given (text, token ids or messages);
    `prompt_index` which prompt, `index` which of its n samples. `logprobs` / `top_logprobs`
    (with logprobs=N) have one entry per id of `token_ids`."""
    prompt: str | list = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    reason: str | None = None
    prompt_index: int = 0
    index: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Seq:
    prompt: object
    prompt_index: int
    index: int
    ids: list[int]
    params: SamplingParams
    seed: int | None


def _derived_seed(seed: int, j: int) -> int:
    """Seed of sample j of a request: the request's seed for j = 0, else a splitmix64 mix of
    (seed, j), so the n samples differ and none depends on the rest of the batch."""
    if j == 0:
        return seed
    z = (seed + j * 0x9E3779B97F4A7C15) & _SEED_MAX
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MAX
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MAX
    return z ^ (z >> 31)


def _is_conversation(p) -> bool:
    return isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and len(p) > 0 \
        and all(isinstance(m, Mapping) for m in p)


def _as_prompt_list(prompts) -> list:
    """One prompt (text, a conversation, a flat list of ids, a 1-D tensor) or a batch -> a list."""
    if isinstance(prompts, (str, bytes, bytearray)):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2):
            raise ValueError(f"prompts tensor has shape {list(prompts.shape)}; expected [Q] or [B, Q] token ids")
        return [prompts] if prompts.dim() == 1 else list(prompts)
    if isinstance(prompts, Mapping):
        raise TypeError("prompts is one message dict; expected a conversation, a list of "
                        "{'role': ..., 'content': ...} dicts (or a list of conversations)")
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts is {type(prompts).__name__}; expected a string, a list of token ids, "
                        "a conversation (list of role/content dicts) or a list of these")
    if _is_conversation(prompts) or (len(prompts) > 0 and all(_is_int(i) for i in prompts)):
        return [prompts]
    return list(prompts)


def _encode(tok, p, i: int, chat: bool) -> list[int]:
    if isinstance(p, (bytes, bytearray)):
        raise TypeError(f"prompt {i} is {type(p).__name__} ({bytes(p[:20])!r}...); expected str "
                        "(decode it first, e.g. p.decode('utf-8')) or a list of token ids")
    if isinstance(p, str):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt {i} is not valid Unicode text: {p[e.start]!r} at index {e.start} "
                             "is a lone surrogate (invalid UTF-8 in the input?); expected UTF-8 text") from None
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) if chat else p)
    if _is_conversation(p):
        return tok.apply_chat_template(p, add_generation_prompt=True)
    if isinstance(p, torch.Tensor):
        if p.dim() != 1 or p.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"prompt {i} is a tensor of shape {list(p.shape)} and dtype {p.dtype}; "
                            "expected 1-D integer token ids")
        return p.tolist()
    if isinstance(p, Sequence) and all(_is_int(t) for t in p):
        return [int(t) for t in p]  # ranges: checked against the model's vocabulary in _plan
    raise TypeError(f"prompt {i} is {type(p).__name__} ({str(p)[:40]!r}); expected a string, a list of "
                    "token ids or a conversation (list of role/content dicts)")


def _plan(model: Model, prompts, sampling, chat: bool, interventions, kwargs: dict
          ) -> tuple[list[_Seq], Interventions]:
    """Validate everything once, before any forward pass: -> the sequences to run (prompt-major,
    n per prompt) and the call's interventions (resolved once here, so a bad one fails now)."""
    if not isinstance(model, Model):
        raise TypeError(f"model is {type(model).__name__}; expected a moe_engine.Model (moe_engine.load())")
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS) - INTERVENTION_KEYS)
    if unknown:
        raise TypeError(f"generate() got unknown keyword argument(s) {unknown}; expected sampling "
                        f"keywords {list(SAMPLING_KEYS)} or interventions {sorted(INTERVENTION_KEYS)}")
    if not isinstance(chat, bool):
        raise TypeError(f"chat = {chat!r}; expected True or False")
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"the model at {model.path} has no tokenizer.json; generation needs one to "
                         "turn tokens into text (model.forward takes token ids without it)")
    plist = _as_prompt_list(prompts)
    if len(plist) == 0:
        raise ValueError("no prompts given; expected at least one prompt")
    overrides = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
    if sampling is None:
        sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
        per_prompt = [sampling] * len(plist)
    elif isinstance(sampling, Sequence) and all(isinstance(s, SamplingParams) for s in sampling):
        if len(sampling) != len(plist):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(plist)} prompts; expected one "
                             "per prompt (or a single one for all)")
        per_prompt = list(sampling)
    else:
        raise TypeError(f"sampling is {type(sampling).__name__}; expected a SamplingParams, one per "
                        "prompt, or None")
    if overrides:
        per_prompt = [replace(s, **overrides) for s in per_prompt]
    ctx = model.config.max_position_embeddings
    seqs = []
    for i, (p, sp) in enumerate(zip(plist, per_prompt)):
        ids = _encode(tok, p, i, chat)
        if len(ids) == 0:
            raise ValueError(f"prompt {i} encodes to no tokens; expected at least one")
        bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary; expected "
                             f"0..{model.config.vocab_size - 1}")
        if len(ids) + sp.max_new_tokens > ctx:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; + max_new_tokens {sp.max_new_tokens} "
                             f"that exceeds the model's context of {ctx} tokens")
        for j in range(sp.n):
            seqs.append(_Seq(p, i, j, ids, sp, None if sp.seed is None else _derived_seed(sp.seed, j)))
    if interventions is not None and not isinstance(interventions, Interventions):
        raise TypeError(f"interventions is {type(interventions).__name__}; expected an Interventions "
                        "or None (or pass topk=, expert_mask=, ... as keywords)")
    iv = for_call(interventions, kwargs)
    iv.resolve(model.config, model.device)
    return seqs, iv


def iter_generate(model: Model, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                  *, chat: bool = False, interventions: Interventions | None = None,
                  capture: Capture | None = None, usage: torch.Tensor | None = None,
                  backend: str | None = None, **kwargs) -> Iterator[TokenEvent]:
    """Prefill all sequences as one left-padded batch, then decode one token per step for every
    unfinished sequence, yielding TokenEvents as they come. A sequence stops at EOS, at a stop
    string (not emitted), or after its max_new_tokens. Keywords: the fields of SamplingParams
    (override `sampling`'s) and interventions (topk=, expert_mask=, ...). Everything is checked
    before the first forward pass; NaN/Inf logits raise NonFiniteLogitsError naming the step."""
    seqs, iv = _plan(model, prompts, sampling, chat, interventions, dict(kwargs))
    return _decode(model, seqs, dict(interventions=iv, capture=capture, usage=usage, backend=backend,
                                     logits="last"))


def _decode(model: Model, seqs: list[_Seq], kw: dict) -> Iterator[TokenEvent]:
    tok = model.tokenizer
    B, dev = len(seqs), model.device
    params = [s.params for s in seqs]
    steps = max(p.max_new_tokens for p in params)
    gens = [None if s.seed is None else torch.Generator(device="cpu").manual_seed(s.seed) for s in seqs]
    all_greedy = all(p.temperature == 0 for p in params)
    want_lp = [p.logprobs for p in params]
    vocab, eos = tok.vocab_size, tok.eos_id
    streams = [tok.stream_decoder() for _ in range(B)]
    pending = [""] * B           # text held back because it may start a stop string
    finished = [False] * B

    ids, mask = left_pad([s.ids for s in seqs], dev)
    cache = model.new_cache(B, ids.shape[1] + steps)
    logits = model.forward(ids, attention_mask=mask, cache=cache, step=0, **kw)
    for step in range(1, steps + 1):
        logits = logits[:, :vocab]  # rows past the tokenizer belong to no token
        _check_finite(logits, finished, step)
        if all_greedy:
            nxt = logits.argmax(-1).tolist()
        else:  # row by row, each with its own generator: independent of the rest of the batch
            nxt = [0 if finished[i] else int(sample(logits[i:i + 1], params[i], gens[i])[0]) for i in range(B)]
        lp = torch.log_softmax(logits, -1) if any(n is not None for n in want_lp) else None
        for i in range(B):
            if finished[i]:
                continue
            t = nxt[i]
            stop = params[i].stop
            ev_lp = top = None
            if lp is not None and want_lp[i] is not None:
                ev_lp = float(lp[i, t])
                top = []
                if want_lp[i] > 0:
                    v, k = torch.topk(lp[i], min(want_lp[i], vocab))
                    top = list(zip(k.tolist(), v.tolist()))
            if t == eos:
                finished[i] = True
                yield TokenEvent(i, t, pending[i] + streams[i].flush(), True, "eos", ev_lp, top)
                continue
            text = pending[i] + streams[i].push(t)
            cut = _find_stop(text, stop)
            if cut is not None:
                finished[i] = True
                yield TokenEvent(i, t, text[:cut], True, "stop", ev_lp, top)
                continue
            hold = _stop_prefix_len(text, stop)
            pending[i] = text[len(text) - hold:] if hold else ""
            if step == params[i].max_new_tokens:
                finished[i] = True
                yield TokenEvent(i, t, text + streams[i].flush(), True, "length", ev_lp, top)
            else:
                yield TokenEvent(i, t, text[:len(text) - hold], False, None, ev_lp, top)
        if all(finished):
            break
        # a finished row still takes a step (the batch moves together) and its output is
        # dropped: any valid id serves; without an EOS in the tokenizer, its last token. Made on
        # the host, where the tokens already are: forward checks them there and copies them
        # once, so the step itself waits for nothing (on the cpu backend host = device)
        feed = torch.tensor([eos if f and eos is not None else t for f, t in zip(finished, nxt)])
        logits = model.forward(feed.unsqueeze(1), cache=cache, step=step, **kw)


def _check_finite(logits: torch.Tensor, finished: list[bool], step: int) -> None:
    """Never sample from NaN/Inf: they come from non-finite weights or an overflow, and greedy
    would print the same garbage token forever."""
    if bool(torch.isfinite(logits).all()):
        return
    bad = (~torch.isfinite(logits)).any(-1).tolist()
    rows = [i for i, b in enumerate(bad) if b and not finished[i]]
    if rows:
        raise NonFiniteLogitsError(
            f"generation step {step}: the model's logits for sequence(s) {rows} contain NaN or Inf "
            "(non-finite weights or an overflow); stopping instead of emitting text")


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


def generate(model: Model, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None,
             *, chat: bool = False, interventions: Interventions | None = None,
             capture: Capture | None = None, usage: torch.Tensor | None = None,
             backend: str | None = None, **kwargs) -> list[Completion]:
    """One Completion per prompt and sample, prompt-major (with n per prompt, prompt i's are
    out[i*n:(i+1)*n]). Same arguments as iter_generate."""
    seqs, iv = _plan(model, prompts, sampling, chat, interventions, dict(kwargs))
    out = [Completion(s.prompt, prompt_index=s.prompt_index, index=s.index,
                      logprobs=None if s.params.logprobs is None else [],
                      top_logprobs=None if s.params.logprobs is None else []) for s in seqs]
    for ev in _decode(model, seqs, dict(interventions=iv, capture=capture, usage=usage, backend=backend,
                                        logits="last")):
        c = out[ev.seq]
        c.text += ev.text
        if ev.reason != "eos":
            c.token_ids.append(ev.token_id)
            if c.logprobs is not None:
                c.logprobs.append(ev.logprob)
                c.top_logprobs.append(ev.top_logprobs)
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


def _int_in(lo: int, hi: int | None, what: str):
    """argparse type: an int in lo..hi, else an error naming the value and the range."""
    def parse(s: str) -> int:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer; expected {what} ({rng})") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range; expected {what} ({rng})")
        return v
    return parse


def _finite_float(what: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number; expected {what}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{s!r} is not finite; expected {what}")
        return v
    return parse


def max_threads() -> int:
    """The most --threads the CLIs accept: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m moe_engine.generate", 
        description="Generate text from a DeepSeekMoE checkpoint (default: the bundled small model).",
        epilog="One prompt streams its text as it comes; several print each text when it is complete "
               "('[i] text', in order), or, with --stream, each piece as it comes ('[i] piece' lines). "
               "A summary goes to stderr. Ctrl-C stops, keeps what was printed and exits with 130.")
    ap.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (default: the bundled small model)")
    ap.add_argument("--prompt", action="append", metavar="TEXT",
                    help="prompt text; repeat for a batch (default: 'The')")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the chat format as a user turn (default: off)")
    ap.add_argument("--stream", action="store_true",
                    help="with several prompts, print each piece of text as it comes, tagged [i] (default: "
                         "print each text when complete; one prompt always streams)")
    ap.add_argument("--echo", action="store_true", help="print each prompt before its completion (default: off)")
    g = ap.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=_int_in(1, None, "tokens to generate per prompt"), default=64,
                   metavar="N", help="tokens to generate per prompt (default: %(default)s)")
    g.add_argument("--temperature", type=_finite_float("a finite number >= 0"), default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=_finite_float("a number in (0, 1]"), default=1.0, metavar="P",
                   help="nucleus sampling: keep the smallest set of tokens reaching probability P (default: %(default)s)")
    g.add_argument("--top-k", type=_int_in(0, None, "tokens kept for sampling, 0 = all"), default=0, metavar="N",
                   help="sample among the N most likely tokens; 0 = all. Not the experts' top-k: "
                        "see --moe-topk (default: %(default)s)")
    g.add_argument("--seed", type=_int_in(0, _SEED_MAX, "a sampling seed"), metavar="S",
                   help="seed of each prompt's sampling; the same seed gives the same text whatever the "
                        "batch (default: none, a random draw)")
    g.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop before this string; repeatable (default: none)")
    g = ap.add_argument_group("interventions (mixture of experts)")
    g.add_argument("--moe-topk", "--topk", dest="topk", type=_int_in(0, None, "experts per token"), metavar="K",
                   help="routed experts per token in every MoE layer, 0..E (0 = shared experts only); "
                        "--topk is the old spelling (default: the model's num_experts_per_tok)")
    g.add_argument("--expert-mask", metavar="SPEC",
                   help="experts to remove, e.g. '1:0,3;2:5' (layer 1 experts 0 and 3, layer 2 expert 5) "
                        "or '*:7' (expert 7 in every MoE layer) (default: none)")
    g.add_argument("--expert-mask-file", metavar="FILE",
                   help="experts to remove, a mask file written by python -m moe_engine.prune "
                        "(mask.json); not with --expert-mask (default: none)")
    g.add_argument("--mask-mode", default="reroute", choices=["reroute", "zero"],
                   help="reroute: a masked expert cannot be chosen, the next-best takes its slot; zero: "
                        "chosen as usual, its output dropped (default: %(default)s)")
    g.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=None,
                   help="renormalise the top-k weights to sum to 1 (default: the model's norm_topk_prob)")
    g = ap.add_argument_group("runtime")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="weight and activation dtype (default: %(default)s)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "emu"],
                   help="kernels of the MoE layer; auto = cuda on a GPU, else cpu (default: %(default)s)")
    g.add_argument("--threads", type=_int_in(1, max_threads(), "CPU threads"), metavar="N",
                   help=f"CPU threads for torch and the kernels, 1..{max_threads()} (default: torch's choice)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: each process holds 1/N of every MoE layer's experts and "
                        "they exchange tokens; rank 0 prints (default: off)")
    g.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN/Inf (default: refused, naming the tensor)")
    g.add_argument("--no-cuda-graph", action="store_true",
                   help="run decode steps op by op instead of replaying a captured CUDA graph "
                        "(default: graphs on with the cuda backend)")
    add_quant_arguments(ap.add_argument_group("quantization"))
    return ap


class _StdoutError(Exception):
    def __init__(self, err: OSError):
        self.err = err


class _Output:
    """Writes to stdout, flushed at once; a failed write raises _StdoutError, which main turns
    into a quiet exit like a Unix tool's (a closed pipe: 141, as if killed by SIGPIPE; a full
    disk: one error line, 1)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text:
            try:
                self.stream.write(text)
                self.stream.flush()
            except OSError as e:
                raise _StdoutError(e) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = _Output(sys.stdout)
    n_tokens, t0, first = 0, time.perf_counter(), None
    model = None
    interrupted = False
    try:
        if args.model is not None and os.path.exists(args.model) and not os.path.isdir(args.model):
            raise ValueError(f"--model {args.model} is a file; expected a checkpoint directory "
                             "(config.json, model.safetensors, tokenizer.json)")
        device = check_device(args.device)
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed,
                                  max_new_tokens=args.max_new_tokens, stop=args.stop)
        if args.expert_parallel:
            distributed.init(device, expert_parallel=True)
            if not distributed.is_main():  # every rank runs the same steps; rank 0 prints
                out = _Output(open(os.devnull, "w"))
        model = Model.load(args.model, dtype=args.dtype, device=device, backend=args.backend,
                           progress=sys.stderr.isatty() and distributed.is_main(),
                           allow_nonfinite=args.allow_nonfinite,
                           expert_parallel=args.expert_parallel,
                           cuda_graph=False if args.no_cuda_graph else None, **quant_kwargs(args))
        mask = None
        if args.expert_mask and args.expert_mask_file:
            raise ValueError("give --expert-mask or --expert-mask-file, not both")
        if args.expert_mask:
            mask = parse_expert_mask(args.expert_mask, model.config.num_hidden_layers)
        elif args.expert_mask_file:
            from .prune import load_mask
            mask = load_mask(args.expert_mask_file, model.config.num_hidden_layers, model.config.n_routed_experts)
        prompts = args.prompt or ["The"]
        many = len(prompts) > 1
        texts = [""] * len(prompts)
        t0 = time.perf_counter()
        events = iter_generate(model, prompts, sampling, chat=args.chat, topk=args.topk, expert_mask=mask,
                               mask_mode=args.mask_mode, renormalize=args.renormalize)
        if args.echo and not many:
            out.write(prompts[0])
        for ev in events:
            if first is None:
                first = time.perf_counter()
            n_tokens += ev.reason != "eos"
            if not many:
                out.write(ev.text)
            elif args.stream:
                if ev.text:
                    out.write(f"[{ev.seq}] {ev.text}\n")
            else:
                texts[ev.seq] += ev.text
                if ev.finished:  # each text whole, as soon as it is complete
                    head = prompts[ev.seq] if args.echo else ""
                    out.write(f"[{ev.seq}] {head}{texts[ev.seq]}\n")
        if not many:
            out.write("\n")
    except KeyboardInterrupt:
        interrupted = True
    except _StdoutError as e:
        _quiet_stdout()
        if e.err.errno == errno.EPIPE:
            return 141
        print(f"error: cannot write to stdout: {e.err.strerror or e.err}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.finish()
    if not distributed.is_main():
        return 130 if interrupted else 0
    if model is not None and (first is not None or interrupted):
        dt = time.perf_counter() - t0
        decode_dt = time.perf_counter() - (first or t0)
        B = len(args.prompt or ["The"])
        rate = (n_tokens - B) / decode_dt if n_tokens > B and decode_dt > 0 else float("nan")
        end = "; interrupted" if interrupted else ""
        print(f"\n[{n_tokens} tokens in {dt:.2f} s; decode {rate:.1f} tok/s; backend {model.backend}; "
              f"{model.path}{end}]", file=sys.stderr)
    elif interrupted:
        print("\n[interrupted]", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
