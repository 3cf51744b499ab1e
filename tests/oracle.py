"""An independent DeepSeekMoE forward written straight from docs/model.md
(the Hugging Face remote code's semantics), to check the engine against. Deliberately naive:
no KV cache, no batching, explicit attention softmax, a loop over experts in ascending id order
with bf16(p_e * y_e) accumulated in the model dtype, router softmax in the model dtype.

It reads the raw Hugging Face tensors (not the engine's packed weights), so a packing bug in the
loader shows up as a mismatch too. Interventions follow docs/design.md §5 literally.
"""
import math

import torch
import torch.nn.functional as F
from safetensors import safe_open


def read_raw(path, dtype):
    import json
    from pathlib import Path
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    w = {}
    for f in files:
        with safe_open(str(f), "pt") as g:
            for k in g.keys():
                w[k] = g.get_tensor(k).to(dtype)
    return cfg, w


def _norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _mlp(x, p, w):
    return F.linear(F.silu(F.linear(x, w[p + "gate_proj.weight"])) * F.linear(x, w[p + "up_proj.weight"]),
                    w[p + "down_proj.weight"])


def forward(cfg, w, ids, *, topk=None, mask=None, mask_mode="reroute", force=None, renormalize=None,
            fp32_router=False):
    """ids: list[int] (one sequence). Returns float32 logits [T, V].
    topk: int or {layer: k}; mask: {layer: set(ids)}; force: {layer: id}."""
    dt = w["model.embed_tokens.weight"].dtype
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = D // H
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    fr = torch.outer(torch.arange(T).float(), inv)
    emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)

    def rot(t):
        return torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)

    renorm = cfg.get("norm_topk_prob", False) if renormalize is None else renormalize
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = _norm(x, w[p + "input_layernorm.weight"], eps)
        q = F.linear(h, w[p + "self_attn.q_proj.weight"]).view(T, H, hd).transpose(0, 1)
        k = F.linear(h, w[p + "self_attn.k_proj.weight"]).view(T, H, hd).transpose(0, 1)
        v = F.linear(h, w[p + "self_attn.v_proj.weight"]).view(T, H, hd).transpose(0, 1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        s = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(hd)
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
        a = (torch.softmax(s, -1) @ v.float()).to(dt)
        x = x + F.linear(a.transpose(0, 1).reshape(T, D), w[p + "self_attn.o_proj.weight"])
        h = _norm(x, w[p + "post_attention_layernorm.weight"], eps)
        is_moe = l >= cfg["first_k_dense_replace"] and l % cfg["moe_layer_freq"] == 0
        if not is_moe:
            x = x + _mlp(h, p + "mlp.", w)
            continue
        E = cfg["n_routed_experts"]
        K = cfg["num_experts_per_tok"] if topk is None else (topk if isinstance(topk, int) else topk.get(l, cfg["num_experts_per_tok"]))
        logits = F.linear(h, w[p + "mlp.gate.weight"])
        probs = torch.softmax(logits.float(), -1) if fp32_router else torch.softmax(logits, -1).float()
        masked = set() if mask is None else set(mask.get(l, ()))
        fe = None if force is None else (force if isinstance(force, int) else force.get(l))
        y = torch.zeros_like(h)
        for t in range(T):
            cand = [e for e in range(E) if not (mask_mode == "reroute" and e in masked)]
            cand.sort(key=lambda e: (-float(probs[t, e]), e))
            if fe is not None:
                cand = [fe] + [e for e in cand if e != fe]
            chosen = cand[:K]
            wts = {e: (0.0 if (mask_mode == "zero" and e in masked) else float(probs[t, e])) for e in chosen}
            if renorm and K > 0:
                tot = sum(wts.values())
                if tot > 0:
                    wts = {e: v / tot for e, v in wts.items()}
            for e in sorted(chosen):  # remote code: ascending expert id, bf16 accumulate
                ye = _mlp(h[t:t + 1], p + f"mlp.experts.{e}.", w)
                y[t:t + 1] = y[t:t + 1] + (torch.tensor(wts[e], dtype=torch.float32) * ye.float()).to(dt)
        if cfg.get("n_shared_experts"):
            y = y + _mlp(h, p + "mlp.shared_experts.", w)
        x = x + y
    x = _norm(x, w["model.norm.weight"], eps)
    return F.linear(x, w["lm_head.weight"]).float()
