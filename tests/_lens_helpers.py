"""Checkpoints and fixtures shared by test_taps.py, test_interventions.py and test_lens.py
(the random tiny fp32 checkpoint is conftest.py's `tiny_fp32_dir`).

Two hand-built checkpoints make the lens analyses' answers known in closed form:

`routing_checkpoint` (E = 12, k = 6): attention, every MLP and every expert write nothing
(o_proj, down_proj = 0), so the residual stream stays the token embedding through all layers.
Tokens whose text holds a digit embed as +e0, all others as -e0; router rows 0..5 are +e0 and
rows 6..11 are -e0. So a digit token picks exactly experts 0..5 in every MoE layer and any other
token exactly 6..11 (the six logits are equal, so with k < 6 the lowest ids win). The tokenizer
adds no BOS, so a domain of digits routes nothing to 6..11.

`analytic_checkpoint` (2 layers: dense 0, MoE 1; E = 8, k = 3): every token embeds as a = e0,
attention and the dense MLP write nothing, norms are 1, the router gives expert e the logit
g_e * r (r = rsqrt(1/D + eps), g_e decreasing), expert e writes M * e_{1+e} exactly, shared
experts write nothing, and lm_head maps e0 to token T_BASE and e_{1+e} to token T_EXPERT + e.
Every lens quantity then has a closed form (`Analytic`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import TOL as PROJECT_TOL

from moe_engine.model import Model
from moe_engine.ops import available_backends
from moe_engine.synthetic import make_checkpoint

# Tiny shapes: one thread is much faster than two on shared, oversubscribed cores
# (idle threads spin-wait), and the results do not depend on it.
torch.set_num_threads(1)

# emu runs the CUDA kernels on the CPU (keep its shapes tiny); cuda needs the model on the GPU;
# the CUDA kernels (so emu too) take bf16 only (docs/design.md §4).
DEVICE = {"torch": "cpu", "cpu": "cpu", "emu": "cpu", "cuda": "cuda"}
DTYPES = {"torch": ("float32", "bfloat16"), "cpu": ("float32", "bfloat16"),
          "emu": ("bfloat16",), "cuda": ("bfloat16",)}
# Invariants between tensors the engine rounded separately to the model dtype (tolerances.py).
TOL = {name: dict(atol=PROJECT_TOL["tap_invariant", dt][0], rtol=PROJECT_TOL["tap_invariant", dt][1])
       for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}


def _marks(b):
    return [getattr(pytest.mark, b)] if b in ("emu", "cuda") else []   # -m "not emu" skips them


BACKENDS = [pytest.param(b, marks=_marks(b)) for b in available_backends()]
BACKEND_DTYPES = [pytest.param(b, d, marks=_marks(b), id=f"{b}-{d}")
                  for b in available_backends() for d in DTYPES[b]]


def dtype_of(backend: str) -> str:
    """The most precise dtype a backend runs: fp32 where it can, else bf16."""
    return DTYPES[backend][0]


def edit_checkpoint(path: Path, fn) -> None:
    """Apply fn(name -> tensor dict, config) to a single-file checkpoint, in place."""
    f = path / "model.safetensors"
    t = load_file(str(f))
    cfg = json.loads((path / "config.json").read_text())
    fn(t, cfg)
    save_file({k: v.contiguous() for k, v in t.items()}, str(f), metadata={"format": "pt"})


def set_add_bos(path: Path, add: bool) -> None:
    p = path / "tokenizer_config.json"
    c = json.loads(p.read_text())
    c["add_bos_token"] = add
    p.write_text(json.dumps(c))


def load(path, backend="torch", dtype=None) -> Model:
    dtype = dtype_of(backend) if dtype is None else dtype
    return Model.load(path, dtype=dtype, device=DEVICE[backend], backend=backend, progress=False)


# ---- routing known answer ------------------------------------------------------------------

ROUTE_E, ROUTE_K = 12, 6


@pytest.fixture(scope="session")
def routing_dir(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("route12"), "tiny", dtype="float32",
                           overrides={"n_routed_experts": ROUTE_E, "num_experts_per_tok": ROUTE_K})
    from moe_engine.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(path)
    digit = torch.tensor([any(ch.isdigit() for ch in tok.decode([i], skip_special=False))
                          for i in range(tok.vocab_size)])

    def fn(t, cfg):
        V, D = t["model.embed_tokens.weight"].shape
        emb = torch.zeros(V, D)
        emb[: len(digit), 0] = torch.where(digit, 1.0, -1.0)
        emb[len(digit):, 0] = -1.0
        t["model.embed_tokens.weight"] = emb
        for name in list(t):
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                t[name] = torch.zeros_like(t[name])
            elif name.endswith("layernorm.weight"):
                t[name] = torch.ones_like(t[name])
            elif name.endswith("mlp.gate.weight"):
                g = torch.zeros_like(t[name])
                g[:6, 0], g[6:, 0] = 1.0, -1.0
                t[name] = g

    edit_checkpoint(path, fn)
    set_add_bos(path, False)
    return path


# ---- analytic checkpoint ---------------------------------------------------------------------

class Analytic:
    E, K, D = 8, 3, 64
    EPS = 1e-6
    M = 3.0                        # |E_e(u)|
    T_BASE, T_EXPERT = 10, 20      # lm_head: e0 -> token 10, e_{1+e} -> token 20 + e
    G = [0.5 - 0.05 * e for e in range(8)]   # router gain per expert (logit = G_e * r)

    @classmethod
    def r(cls) -> float:
        return 1.0 / math.sqrt(1.0 / cls.D + cls.EPS)

    @classmethod
    def probs(cls) -> torch.Tensor:
        return torch.softmax(torch.tensor(cls.G, dtype=torch.float64) * cls.r(), 0)

    @classmethod
    def hidden(cls, k: int, *, base="resid_mid", renormalize=False,
               weighted=False) -> torch.Tensor:
        """H^{l_k} (float64 [D]); experts 0..K-1 are chosen in that order. weighted: the expert
        outputs are taken as w_j E_j (the MoE Lens code as run)."""
        p = cls.probs()
        h = torch.zeros(cls.D, dtype=torch.float64)
        h[0] = 1.0 if base == "resid_mid" else cls.r()
        c = p[:k].sum() if renormalize and k else 1.0
        for j in range(k):
            h[1 + j] += p[j] * (p[j] if weighted else 1.0) * cls.M / c
        return h

    @classmethod
    def single(cls, j: int, *, base="resid_mid", weighted=False) -> torch.Tensor:
        """base + E_j (weighted: base + w_j E_j), float64 [D]."""
        h = torch.zeros(cls.D, dtype=torch.float64)
        h[0] = 1.0 if base == "resid_mid" else cls.r()
        h[1 + j] = cls.M * (float(cls.probs()[j]) if weighted else 1.0)
        return h

    @classmethod
    def logits(cls, h: torch.Tensor, vocab: int, norm="final") -> torch.Tensor:
        """lm_head(RMSNorm(h)) (norm="none": lm_head(h)) over `vocab` rows, analytic lm_head."""
        x = h / torch.sqrt((h * h).mean() + cls.EPS) if norm == "final" else h
        z = torch.zeros(vocab, dtype=torch.float64)
        z[cls.T_BASE] = x[0]
        for e in range(cls.E):
            z[cls.T_EXPERT + e] = x[1 + e]
        return z

    @classmethod
    def logprobs(cls, h: torch.Tensor, vocab: int, norm="final") -> torch.Tensor:
        """log-softmax over `vocab` rows of lm_head(RMSNorm(h)) for the analytic lm_head."""
        return torch.log_softmax(cls.logits(h, vocab, norm), 0)


@pytest.fixture(scope="session")
def analytic_dir(tmp_path_factory) -> Path:
    A = Analytic
    path = make_checkpoint(tmp_path_factory.mktemp("analytic"), "tiny", dtype="float32", layers=2,
                           overrides={"n_routed_experts": A.E, "num_experts_per_tok": A.K,
                                      "rms_norm_eps": A.EPS})
    r = A.r()
    s = r / (1.0 + math.exp(-r)) * r        # silu(r) * r: expert hidden unit 0 for input u = r e0

    def fn(t, cfg):
        V, D = t["model.embed_tokens.weight"].shape
        assert D == A.D
        emb = torch.zeros(V, D)
        emb[:, 0] = 1.0
        t["model.embed_tokens.weight"] = emb
        lm = torch.zeros(V, D)
        lm[A.T_BASE, 0] = 1.0
        for e in range(A.E):
            lm[A.T_EXPERT + e, 1 + e] = 1.0
        t["lm_head.weight"] = lm
        for name in list(t):
            if name.endswith("norm.weight"):
                t[name] = torch.ones_like(t[name])
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                t[name] = torch.zeros_like(t[name])
        g = torch.zeros(A.E, D)
        g[:, 0] = torch.tensor(A.G)
        t["model.layers.1.mlp.gate.weight"] = g
        for e in range(A.E):
            p = f"model.layers.1.mlp.experts.{e}."
            for w in ("gate_proj", "up_proj"):
                x = torch.zeros_like(t[p + w + ".weight"])
                x[0, 0] = 1.0
                t[p + w + ".weight"] = x
            d = torch.zeros_like(t[p + "down_proj.weight"])
            d[1 + e, 0] = A.M / s
            t[p + "down_proj.weight"] = d

    edit_checkpoint(path, fn)
    return path
