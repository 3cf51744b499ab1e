"""The logit lens and the MoE-specific residuals it decodes (docs/lens.md, early decoding).

Shape legend: N captured tokens, K top-k of the layer, D hidden, V vocab, n_top top tokens.

Per MoE layer l and token t, with a = hook_resid_mid, u = moe.hook_in, w_j = hook_topk_weights
(rank order), E_j = hook_expert_out (unweighted):

    cumulative(k)  H^{l_k} = base + sum_{j<=k} c_j w_j E_j      k = 1..K      [N, K, D]
    single(j)               base + E_j                                         [N, K, D]

base = a ("resid_mid", the residual before post_attention_layernorm) or u ("moe_in", the
normed MoE input); c_j = 1, or 1 / sum_{i<=k} w_i when renormalised. Shared experts are excluded
by definition; for k = K, base = a and no renormalisation, H^{l_K} + shared_out =
hook_resid_post. `weighted=True` replaces E_j by w_j E_j: what the MoE Lens code actually stored
(DeepSeek's remote code scales each expert's output in place after the forward hook has kept a
reference to it), so its H^{l_k} was base + sum c_j w_j^2 E_j and its single column base + w_j E_j
(docs/lens.md, "paper-as-run").

`logit_lens` decodes any [..., D] tensor through lm_head(RMSNorm_final(.)) (norm="final", the
canonical lens) or lm_head(.) (norm="none", the paper's final figures), in row chunks so that
no [N, K, V] tensor exists unless `full=True` asks for one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Model, rms_norm

NORMS = ("final", "none")
BASES = ("resid_mid", "moe_in")
LOGIT_BUDGET = 1 << 26        # fp32 logits per row chunk (256 MB): bounds lens memory at V = 102400


def lens_tap_names(layer: int | str = "*", base: str = "resid_mid") -> list[str]:
    """The taps `cumulative` / `single` need, for one layer or all ("*")."""
    if base not in BASES:
        raise ValueError(f"base = {base!r}; expected one of {BASES}")
    b = f"blocks.{layer}.hook_resid_mid" if base == "resid_mid" else f"blocks.{layer}.moe.hook_in"
    return [b, f"blocks.{layer}.moe.hook_topk_weights", f"blocks.{layer}.moe.hook_expert_out"]


def _parts(taps, layer: int, base: str, weighted: bool = False):
    b, w, e = (taps[n] for n in lens_tap_names(layer, base))
    b, w, e = b.float(), w.float(), e.float()
    return b, w, (w.unsqueeze(-1) * e if weighted else e)


def renormalised(acc: torch.Tensor, s: torch.Tensor, skip: float = 0.0) -> torch.Tensor:
    """acc / s where s > 0 and |s - 1| > skip, else acc unchanged (s broadcasts against acc).
    skip = 1e-5 is the MoE Lens code's rule (it divides only when the weights do not already
    sum to 1 within 1e-5); 0 always divides."""
    do = (s > 0) & ((s - 1.0).abs() > skip)
    return torch.where(do, acc / torch.where(do, s, torch.ones_like(s)), acc)


def cumulative(taps, layer: int, *, base: str = "resid_mid", renormalize: bool = False,
               weighted: bool = False, renorm_skip: float = 0.0) -> torch.Tensor:
    """H^{l_k} for k = 1..K as [N, K, D] float32, from a Capture (or any name -> tensor
    mapping) holding `lens_tap_names(layer, base)`. weighted / renorm_skip: see the module
    docstring and `renormalised`."""
    b, w, e = _parts(taps, layer, base, weighted)
    acc = torch.cumsum(w.unsqueeze(-1) * e, dim=1)                       # [N, K, D]
    if renormalize:
        acc = renormalised(acc, torch.cumsum(w, dim=1).unsqueeze(-1), renorm_skip)
    return b.unsqueeze(1) + acc


def single(taps, layer: int, *, base: str = "resid_mid", weighted: bool = False) -> torch.Tensor:
    """base + E_j (weighted: base + w_j E_j) for each chosen expert j = 1..K, [N, K, D] float32."""
    b, _, e = _parts(taps, layer, base, weighted)
    return b.unsqueeze(1) + e


@dataclass
class ExpertView:
    """The tokens one expert processed in one layer: rows index the capture's rows."""
    rows: torch.Tensor      # [n] int64
    slots: torch.Tensor     # [n] rank of the expert among the token's choices
    weights: torch.Tensor   # [n] float32
    out: torch.Tensor       # [n, D] unweighted expert output


def expert_view(taps, layer: int, expert: int) -> ExpertView:
    """Rows of `layer`'s captured tokens routed to `expert` (empty, never an error, when none
    was). Needs moe.hook_topk_ids, hook_topk_weights and hook_expert_out of that layer."""
    p = f"blocks.{layer}.moe."
    ids, w = taps[p + "hook_topk_ids"], taps[p + "hook_topk_weights"]
    e = taps[p + "hook_expert_out"]
    rows, slots = (ids == expert).nonzero(as_tuple=True)
    return ExpertView(rows, slots, w[rows, slots], e[rows, slots])


@dataclass
class LensOutput:
    """Result of `logit_lens`; leading dims are those of the decoded tensor."""
    top_ids: torch.Tensor | None = None          # [..., n_top] int64
    top_probs: torch.Tensor | None = None        # [..., n_top] float32
    top_logits: torch.Tensor | None = None       # [..., n_top] float32: the raw lm_head scores
    target_logprobs: torch.Tensor | None = None  # [..., m] float32
    logprobs: torch.Tensor | None = None         # [..., V] float32, only with full=True

    def tokens(self, tokenizer) -> list:
        """top_ids as nested lists of readable token strings (see token_text)."""
        def conv(x):
            if x.dim() == 1:
                return [token_text(tokenizer, int(i)) for i in x]
            return [conv(r) for r in x]
        return conv(self.top_ids.cpu())


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (GPT-2's bytes_to_unicode)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_text(tokenizer, i: int) -> str:
    """The text of one token; a token that is only part of a UTF-8 character (it decodes to
    U+FFFD) is shown as its bytes, e.g. "<E2><80>", so distinct tokens stay distinct."""
    if tokenizer is None:
        return str(i)
    text = tokenizer.decode([i], skip_special=False)
    if "\ufffd" not in text:
        return text
    raw = tokenizer.id_to_token(i)
    if raw and all(ch in _BYTES for ch in raw):
        data = bytes(_BYTES[ch] for ch in raw)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"<{b:02X}>" for b in data)
    return raw or text


@torch.no_grad()
def logit_lens(model: Model, hidden: torch.Tensor, *, norm: str = "final", top: int = 5,
               targets: torch.Tensor | None = None, full: bool = False,
               vocab: int | None = None) -> LensOutput:
    """Decode residual-stream vectors `hidden` [..., D] to next-token distributions.

    norm: "final" = lm_head(RMSNorm_final(h)) (the model's own last step: decoding the last
    layer's hook_resid_post reproduces the model's logits), "none" = lm_head(h).
    top: how many most likely tokens to return (0 for none). targets [..., m] (or [...]): token
    ids whose log-probabilities to return. full: also return all log-probs [..., V].
    vocab: ignore logit rows >= vocab (default: the tokenizer's size, rows past it belong to no
    token)."""
    if norm not in NORMS:
        raise ValueError(f"norm = {norm!r}; expected one of {NORMS}")
    w = model.weights
    D = w.lm_head.shape[1]
    if hidden.shape[-1] != D:
        raise ValueError(f"hidden has last dim {hidden.shape[-1]}; "
                         f"expected the model's hidden size {D}")
    V = w.lm_head.shape[0]
    if vocab is None:
        vocab = model.tokenizer.vocab_size if model.tokenizer is not None else V
    lead = hidden.shape[:-1]
    x = hidden.reshape(-1, D).to(model.device)
    N = x.shape[0]
    if targets is not None:
        targets = torch.as_tensor(targets, device=model.device).long()
        squeeze = targets.shape == lead
        targets = targets.reshape(N, -1)
        if int(targets.numel()) and (bool((targets < 0).any()) or bool((targets >= vocab).any())):
            raise ValueError(f"targets must be token ids in [0, {vocab})")
    n_top = min(top, vocab)
    ids_out = torch.empty((N, n_top), dtype=torch.long, device=model.device)
    probs_out = torch.empty((N, n_top), dtype=torch.float32, device=model.device)
    logit_out = torch.empty((N, n_top), dtype=torch.float32, device=model.device)
    tgt_out = (None if targets is None
               else torch.empty(targets.shape, dtype=torch.float32, device=model.device))
    full_out = torch.empty((N, vocab), dtype=torch.float32, device=model.device) if full else None
    step = max(1, LOGIT_BUDGET // V)
    for lo in range(0, N, step):
        h = x[lo:lo + step].to(model.dtype)
        if norm == "final":
            h = rms_norm(h, w.final_norm, model.config.rms_norm_eps)
        z = model.lm_head_logits(h).float()[:, :vocab]
        logp = torch.log_softmax(z, dim=-1)                                  # [n_rows, V]
        if n_top:
            lp, ix = torch.topk(logp, n_top, dim=-1)    # ties: torch.topk order (lower id first on CPU)
            ids_out[lo:lo + step], probs_out[lo:lo + step] = ix, lp.exp()
            logit_out[lo:lo + step] = z.gather(1, ix)
        if targets is not None:
            tgt_out[lo:lo + step] = logp.gather(1, targets[lo:lo + step])
        if full:
            full_out[lo:lo + step] = logp
    out = LensOutput()
    if n_top:
        out.top_ids, out.top_probs = ids_out.view(*lead, n_top), probs_out.view(*lead, n_top)
        out.top_logits = logit_out.view(*lead, n_top)
    if targets is not None:
        out.target_logprobs = tgt_out.view(*lead) if squeeze else tgt_out.view(*lead, -1)
    if full:
        out.logprobs = full_out.view(*lead, vocab)
    return out
