"""Train the small DeepSeekMoE-architecture model that ships in src/moe_engine/assets/small/.

Shape legend: B batch, Q sequence length, T = B·Q tokens, D hidden, H heads, E routed experts, K top-k,
F expert width, V vocab, L layers.

1. Trains a byte-level BPE tokenizer (`tokenizers`) on the train split of tools/build_corpus.py,
   with the DeepSeek conventions: digits split one per token, BOS `<｜begin▁of▁sentence｜>` and EOS
   `<｜end▁of▁sentence｜>` appended after the BPE ids, BOS prepended on encode.
2. Trains a compact PyTorch model whose forward is exactly the inference semantics of
   docs/model.md: RMSNorm casting back to the model dtype before the weight,
   rotate-half RoPE over the whole head, causal MHA, layer 0 dense, softmax router without
   renormalisation (top-k weights are raw probabilities), shared experts (one SwiGLU MLP of width
   n_shared·F) added to the routed sum. Loss = next-token cross-entropy + the DeepSeekMoE
   expert-level balance loss α·Σ_i f_i·P_i per MoE layer (f_i = E/(K·T)·hits_i, P_i = mean_t s_i,t).
   AdamW, linear warmup + cosine decay, fp32, seeded; the experts run as one sort by expert and
   one matmul pair per expert over all of that expert's slots in the batch.
3. Saves the Hugging Face directory as published (config.json, model.safetensors in bf16 with
   the published tensor names, tokenizer.json, tokenizer_config.json, generation_config.json),
   the per-step log (train_log.json) and the loss curve (loss.png).

    python tools/build_corpus.py --out out/corpus --seed 0
    python tools/train_small.py --corpus out/corpus --out src/moe_engine/assets/small --minutes 45
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_corpus import DOMAINS, load_split  # noqa: E402

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(corpus: Path, bpe_vocab: int, max_chars_per_domain: int = 3_000_000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])

    def texts():  # equal share per domain, in file order: deterministic
        for dom in DOMAINS:
            n = 0
            for doc in load_split(corpus, dom, "train"):
                if n >= max_chars_per_domain:
                    break
                n += len(doc["text"])
                yield doc["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    tok.add_special_tokens([BOS, EOS])  # after the BPE ids, as in the published tokenizer
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}
    return {"add_bos_token": True, "add_eos_token": False, "bos_token": added(BOS),
            "clean_up_tokenization_spaces": False, "eos_token": added(EOS), "legacy": True,
            "model_max_length": model_max_length, "pad_token": added(EOS), "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizerFast", "unk_token": None, "use_default_system_prompt": False}


# --------------------------------------------------------------------------------------------
# Model (the training twin of moe_engine's reference forward)


def hf_config(a, vocab_size: int, bos: int, eos: int) -> dict:
    """config.json with every field of the published deepseek-moe-16b-base config."""
    return {
        "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "aux_loss_alpha": a.aux_alpha, "bos_token_id": bos, "eos_token_id": eos,
        "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": a.hidden,
        "initializer_range": 0.02, "intermediate_size": a.dense_width, "max_position_embeddings": a.max_pos,
        "model_type": "deepseek", "moe_intermediate_size": a.expert_width, "moe_layer_freq": 1,
        "n_routed_experts": a.experts, "n_shared_experts": a.shared, "norm_topk_prob": False,
        "num_attention_heads": a.heads, "num_experts_per_tok": a.topk, "num_hidden_layers": a.layers,
        "num_key_value_heads": a.heads, "pretraining_tp": 1, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 10000.0, "scoring_func": "softmax", "seq_aux": True, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0", "use_cache": True,
        "vocab_size": vocab_size,
    }


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(seq: int, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


class Attention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, cos, sin):
        B, Q, D = x.shape
        q, k, v = (p(x).view(B, Q, self.h, D // self.h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, Q, D))


class MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Routed experts packed as w_gate_up [E, 2F, D] (gate rows first) and w_down [E, D, F]."""

    def __init__(self, d, n_experts, k, f, n_shared):
        super().__init__()
        self.E, self.k, self.f = n_experts, k, f
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * f, d))
        self.w_down = nn.Parameter(torch.empty(n_experts, d, f))
        self.shared_experts = MLP(d, f * n_shared)

    def forward(self, x, topk=None):
        """Returns (output, balance term Σ f_i P_i, topk_ids [T, K])."""
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, D]
        T = h.shape[0]
        k = self.k if topk is None else topk
        probs = F.softmax(self.gate(h), dim=-1)  # [T, E]: softmax in the model dtype, as published
        out = self.shared_experts(h)
        if k == 0:
            return out.view(shape), probs.new_zeros(()), torch.empty(T, 0, dtype=torch.long)
        topw, topi = torch.topk(probs, k, dim=-1)  # raw probabilities: norm_topk_prob = false
        flat = topi.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.E)
        tok = order // k
        xs = h.index_select(0, tok)  # [T·K, D] grouped by expert
        ys = []
        # unbind once: indexing the packed parameter per expert would make autograd allocate and
        # zero a full [E, ...] gradient for every expert
        w_gu, w_dn = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        for e, xe in enumerate(xs.split(counts.tolist())):
            if xe.shape[0]:
                g, u = (xe @ w_gu[e].t()).split(self.f, dim=-1)
                ys.append((F.silu(g) * u) @ w_dn[e].t())
        y = torch.cat(ys) * topw.reshape(-1).index_select(0, order).unsqueeze(-1).to(h.dtype)
        routed = torch.zeros_like(h).index_add_(0, tok, y)
        fi = counts.to(probs.dtype) * (self.E / (k * T))
        balance = (fi * probs.float().mean(0)).sum()
        return (routed + out).view(shape), balance, topi


class Block(nn.Module):
    def __init__(self, c, layer):
        super().__init__()
        d = c["hidden_size"]
        self.input_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(d, c["rms_norm_eps"])
        self.self_attn = Attention(d, c["num_attention_heads"])
        self.is_moe = layer >= c["first_k_dense_replace"] and layer % c["moe_layer_freq"] == 0
        self.mlp = (MoE(d, c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"],
                        c["n_shared_experts"]) if self.is_moe else MLP(d, c["intermediate_size"]))

    def forward(self, x, cos, sin, topk=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            m, bal, ids = self.mlp(h, topk)
            return x + m, bal, ids
        return x + self.mlp(h), None, None


class SmallDeepseek(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, i) for i in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def init_weights(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        std = self.c["initializer_range"]
        out_std = std / math.sqrt(2 * self.c["num_hidden_layers"])
        for name, p in sorted(self.named_parameters()):
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                s = out_std if ("o_proj" in name or "down" in name) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    def forward(self, ids, topk=None, return_routing=False):
        """ids [B, Q] -> logits [B, Q, V] fp32, summed balance term, per-MoE-layer topk_ids."""
        x = self.embed_tokens(ids)
        hd = self.c["hidden_size"] // self.c["num_attention_heads"]
        cos, sin = rope_cos_sin(ids.shape[1], hd, self.c["rope_theta"], x.dtype)
        bal, routing = x.new_zeros((), dtype=torch.float32), {}
        for i, blk in enumerate(self.layers):
            x, b, tids = blk(x, cos, sin, topk)
            if b is not None:
                bal = bal + b
                if return_routing:
                    routing[i] = tids
        logits = self.lm_head(self.norm(x)).float()
        return (logits, bal, routing) if return_routing else (logits, bal)


def hf_state_dict(model: SmallDeepseek) -> dict[str, torch.Tensor]:
    """The published tensor names; packed experts split back into experts.{e}.{gate,up,down}_proj."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("w_gate_up"):
            pre = name[: -len("w_gate_up")]
            f = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"model.{pre}experts.{e}.gate_proj.weight"] = t[e, :f]
                out[f"model.{pre}experts.{e}.up_proj.weight"] = t[e, f:]
        elif name.endswith("w_down"):
            pre = name[: -len("w_down")]
            for e in range(t.shape[0]):
                out[f"model.{pre}experts.{e}.down_proj.weight"] = t[e]
        elif name.startswith("lm_head"):
            out[name] = t
        else:
            out[f"model.{name}"] = t
    return out


def load_hf(path: Path, dtype=torch.float32) -> tuple[SmallDeepseek, dict]:
    """Load a saved directory back into the training model (used by eval_small.py and tests)."""
    from safetensors.torch import load_file
    c = json.loads((path / "config.json").read_text())
    model = SmallDeepseek(c)
    sd = load_file(str(path / "model.safetensors"))
    own = {}
    for name, p in model.state_dict().items():
        if name.endswith("w_gate_up"):
            pre = "model." + name[: -len("w_gate_up")]
            own[name] = torch.stack([torch.cat([sd.pop(f"{pre}experts.{e}.gate_proj.weight"),
                                                sd.pop(f"{pre}experts.{e}.up_proj.weight")]) for e in range(p.shape[0])])
        elif name.endswith("w_down"):
            pre = "model." + name[: -len("w_down")]
            own[name] = torch.stack([sd.pop(f"{pre}experts.{e}.down_proj.weight") for e in range(p.shape[0])])
        else:
            own[name] = sd.pop(name if name.startswith("lm_head") else f"model.{name}")
    if sd:
        raise ValueError(f"{path}/model.safetensors: unexpected tensors {sorted(sd)[:5]}")
    model.load_state_dict(own)
    return model.to(dtype).eval(), c


def save_hf(model: SmallDeepseek, tok, out: Path, a) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    c = model.c
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in hf_state_dict(model).items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2, ensure_ascii=False) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(c["max_position_embeddings"]), indent=2, ensure_ascii=False) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"],
         "transformers_version": c["transformers_version"]}, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Data


def encode_domain(tok, corpus: Path, domain: str, split: str, eos: int) -> list[list[int]]:
    """Each document as [BOS] + text + [EOS]."""
    docs = [d["text"] for d in load_split(corpus, domain, split)]
    return [e.ids + [eos] for e in tok.encode_batch(docs)]


class Batches:
    """Random windows of Q+1 tokens; sequence b of a batch comes from domain b mod 4, so every
    batch is domain-balanced. Seeded; the stream depends only on (seed, step)."""

    def __init__(self, streams: list[np.ndarray], batch: int, seq: int, seed: int):
        self.streams, self.batch, self.seq, self.seed = streams, batch, seq, seed

    def get(self, step: int) -> torch.Tensor:
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        rows = []
        for b in range(self.batch):
            s = self.streams[b % len(self.streams)]
            i = int(rng.integers(0, len(s) - self.seq - 1))
            rows.append(s[i:i + self.seq + 1])
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_chunks(docs: list[list[int]], seq: int) -> list[list[int]]:
    """Held-out documents cut into chunks of at most seq+1 tokens (each scored on its own)."""
    out = []
    for ids in docs:
        for i in range(0, len(ids) - 1, seq):
            c = ids[i:i + seq + 1]
            if len(c) >= 2:
                out.append(c)
    return out


@torch.no_grad()
def chunk_nll(model, chunks: list[list[int]], topk=None, batch: int = 8, routing_hist=None):
    """Per-chunk mean NLL (nats/token); optionally accumulates routing hits per MoE layer."""
    res = []
    for i in range(0, len(chunks), batch):
        group = chunks[i:i + batch]
        n = max(len(c) for c in group)
        ids = torch.zeros(len(group), n, dtype=torch.long)
        mask = torch.zeros(len(group), n, dtype=torch.bool)
        for j, c in enumerate(group):
            ids[j, :len(c)] = torch.tensor(c)
            mask[j, :len(c)] = True
        logits, _, routing = model(ids[:, :-1], topk=topk, return_routing=True)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        m = mask[:, 1:]
        res += ((nll * m).sum(1) / m.sum(1)).tolist()
        if routing_hist is not None:
            valid = m.reshape(-1)  # positions whose next token is real
            for layer, tids in routing.items():
                hits = torch.bincount(tids[valid].reshape(-1), minlength=model.c["n_routed_experts"])
                routing_hist.setdefault(layer, torch.zeros_like(hits))
                routing_hist[layer] += hits
    return res


# --------------------------------------------------------------------------------------------
# Training


def lr_at(step, progress, peak, warmup, floor=0.1):
    """Linear warmup over `warmup` steps, then cosine from peak to floor·peak as progress goes 0 → 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def plot_loss(log: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in log["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["ce"] for r in log["steps"]], lw=0.6, alpha=0.5, label="train CE (per step)")
    w = 25
    ce = np.array([r["ce"] for r in log["steps"]])
    if len(ce) > w:
        ax.plot(steps[w - 1:], np.convolve(ce, np.ones(w) / w, "valid"), lw=1.5, label=f"train CE ({w}-step mean)")
    for dom in DOMAINS:
        ev = [(r["step"], r["heldout"][dom]) for r in log["evals"]]
        if ev:
            ax.plot(*zip(*ev), marker="o", ms=3, lw=1, label=f"held-out {dom}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"small DeepSeekMoE: {log['params'] / 1e6:.1f}M params, {log['tokens_seen'] / 1e6:.2f}M tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("out/corpus"))
    ap.add_argument("--out", type=Path, default=Path("src/moe_engine/assets/small"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=None,
                    help="wall-time budget: the schedule's progress is max(step/steps, elapsed/minutes), so the "
                    "cosine always completes; on a shared machine the step count then varies from run to run")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--replay-lr", type=Path, help="take the learning rate of every step (and the step count) "
                    "from this train_log.json: reproduces a --minutes run bit for bit")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-alpha", type=float, default=0.01, help="expert-level balance loss weight α1")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--bpe-vocab", type=int, default=8000)
    ap.add_argument("--vocab-size", type=int, default=8064, help="embedding rows (>= BPE + 2 specials)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--expert-width", type=int, default=64)
    ap.add_argument("--dense-width", type=int, default=512)
    ap.add_argument("--max-pos", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-chunks", type=int, default=24, help="held-out chunks per domain in the periodic eval")
    ap.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.json instead of training one")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(args.tokenizer)) if args.tokenizer else train_tokenizer(args.corpus, args.bpe_vocab)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert tok.get_vocab_size() <= args.vocab_size, (tok.get_vocab_size(), args.vocab_size)
    print(f"[train] tokenizer: {tok.get_vocab_size()} tokens, bos={bos} eos={eos} ({time.time() - t_start:.0f}s)",
          file=sys.stderr)

    streams, held = [], {}
    corpus_tokens = {}
    for dom in DOMAINS:
        docs = encode_domain(tok, args.corpus, dom, "train", eos)
        streams.append(np.fromiter((t for d in docs for t in d), dtype=np.int32))
        hdocs = encode_domain(tok, args.corpus, dom, "heldout", eos)
        held[dom] = heldout_chunks(hdocs, args.seq)
        corpus_tokens[dom] = {"train": int(len(streams[-1])), "heldout": int(sum(len(d) for d in hdocs))}
    print(f"[train] corpus tokens: {corpus_tokens} ({time.time() - t_start:.0f}s)", file=sys.stderr)

    c = hf_config(args, args.vocab_size, bos, eos)
    model = SmallDeepseek(c)
    model.init_weights(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] params: {n_params:,} ({2 * n_params / 1e6:.1f} MB in bf16)", file=sys.stderr)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    data = Batches(streams, args.batch, args.seq, args.seed)
    eval_sets = {d: held[d][: args.eval_chunks] for d in DOMAINS}
    log = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "params": n_params, "corpus_tokens": corpus_tokens, "torch": torch.__version__,
           "steps": [], "evals": []}

    def evaluate(step):
        model.eval()
        r = {d: float(np.mean(chunk_nll(model, eval_sets[d]))) for d in DOMAINS}
        model.train()
        log["evals"].append({"step": step, "heldout": r})
        print(f"[eval] step {step}: " + " ".join(f"{d}={v:.3f}" for d, v in r.items()), file=sys.stderr)

    t_train = time.time()
    tokens = 0
    eval_time = 0.0
    step = 0
    model.train()
    replay = [r["lr"] for r in json.loads(args.replay_lr.read_text())["steps"]] if args.replay_lr else None
    n_steps = len(replay) if replay else args.steps
    for step in range(n_steps):
        progress = step / n_steps
        if args.minutes is not None and not replay:
            progress = max(progress, (time.time() - t_train) / (60 * args.minutes))
            if progress >= 1.0:
                print(f"[train] time budget reached at step {step}", file=sys.stderr)
                break
        lr = replay[step] if replay else lr_at(step, progress, args.lr, args.warmup, args.min_lr_frac)
        for gi in opt.param_groups:
            gi["lr"] = lr
        batch = data.get(step)
        logits, bal = model(batch[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = ce + args.aux_alpha * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        tokens += batch[:, :-1].numel()
        el = time.time() - t_train - eval_time
        n_moe = sum(1 for b in model.layers if b.is_moe)
        log["steps"].append({"step": step, "ce": round(ce.item(), 5), "balance": round(bal.item() / n_moe, 5),
                             "lr": lr, "progress": round(progress, 5), "grad_norm": round(gnorm.item(), 4), "tokens": tokens,
                             "elapsed_s": round(el, 2)})
        if step % 10 == 0:
            print(f"[train] step {step} ce {ce.item():.4f} bal {bal.item() / n_moe:.4f} lr {lr:.2e} "
                  f"gnorm {gnorm.item():.2f} {tokens / el:.0f} tok/s", file=sys.stderr, flush=True)
        if args.eval_every and step > 0 and step % args.eval_every == 0:
            t0 = time.time()
            evaluate(step)
            eval_time += time.time() - t0
    else:
        step = n_steps
    evaluate(step)
    train_s = time.time() - t_train - eval_time
    log.update({"steps_done": step, "tokens_seen": tokens, "train_seconds": round(train_s, 1),
                "tokens_per_s": round(tokens / max(train_s, 1e-9), 1), "threads": args.threads,
                "wall_seconds_total": round(time.time() - t_start, 1)})
    save_hf(model, tok, args.out, args)
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    plot_loss(log, args.out / "loss.png")
    size = (args.out / "model.safetensors").stat().st_size
    print(f"[train] saved {args.out} ({size / 1e6:.1f} MB); {tokens:,} tokens in {train_s:.0f}s = "
          f"{tokens / train_s:.0f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    main()
