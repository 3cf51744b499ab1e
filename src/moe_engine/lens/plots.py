"""PNG plots of the lens analyses, drawn from their JSON (so a saved result can be re-plotted).
Each plot reads without the docs: titles say in words what is shown, axes show integer layers
and experts, panels that a reader compares share their scales, legends give n per domain.

    plot_routing        per layer: one bar panel per domain (shared y axis), percent of tokens
                        per expert, red dashed uniform baseline k/E; plus a layer x expert
                        heatmap per domain on one colour scale
    plot_early_decode   layers x (layer output | H^{l_k}, k = 1..K | each single expert) table of
                        top-1 tokens, colour = probability (or raw logit, paper presets)
    plot_topk_sweep     perplexity vs k, one line per domain, % change vs the reference k marked
    plot_similarity     cos(H^{l_1}, H^{l_K}) per layer per domain (band: ±1 s.d. over tokens),
                        and the layer output's cosine with H^{l_1} and H^{l_K}
    plot_router_stats   router entropy per layer per domain; mean router probability heatmaps
    plot_coactivation   lift of expert pairs per layer (one panel per domain, one scale)
    plot_vocab          the top tokens of the busiest experts of each layer

Each returns the file (or list of files) written. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .files import atomic_write  # noqa: E402

DPI = 120


def _short(token: str, width: int = 10) -> str:
    s = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    s = s if s.strip() else repr(token)[1:-1] or "␣"
    return s if len(s) <= width else s[:width - 1] + "…"


def _save(fig, path: Path) -> Path:
    """Written whole or not at all (lens/files.py); the format follows the suffix of `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=DPI,
                                                   bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _int_axis(axis) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def _preset_note(res: dict) -> str:
    p = res.get("preset")
    return "" if p in (None, "notes") else f" [{p} definitions]"


def plot_routing(res: dict, out_dir: str | Path, layers=None) -> list[Path]:
    out = Path(out_dir)
    E = res["model"]["experts"]
    names = list(res["domains"])
    moe = [str(l) for l in res["model"]["moe_layers"]]
    layers = moe if layers is None else [str(l) for l in layers]
    files = []
    x = list(range(E))
    for l in layers:
        fig, axes = plt.subplots(len(names), 1, figsize=(max(6, E * 0.16), 2.3 * len(names)),
                                 sharex=True, sharey=True, squeeze=False)
        k = res["topk"][int(l)]
        for ax, name in zip(axes[:, 0], names):
            d = res["domains"][name]
            pct = d["layers"][l]["percent"]
            ax.bar(x, pct, color="tab:blue", width=0.8, label=f"{name} (n = {d['tokens']} tokens)")
            ax.axhline(res["uniform_percent"][l], color="red", linestyle="--", linewidth=1.2,
                       label=f"uniform k/E = {res['uniform_percent'][l]:.2f}%")
            half = d["layers"][l]["experts_for_half"]
            ax.set_title(f"{name}: {half} of {E} experts take half of the routing decisions",
                         fontsize=9)
            ax.set_ylabel("% of tokens")
            ax.legend(loc="upper right", fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        axes[-1, 0].set_xlabel("expert id")
        _int_axis(axes[-1, 0].xaxis)
        fig.suptitle(f"Share of tokens routed to each expert, layer {l} (each token picks "
                     f"{k} of {E}; bars sum to {100 * k}%){_preset_note(res)}", fontsize=10)
        files.append(_save(fig, out / f"routing_layer{int(l):02d}.png"))
    # overview: layer x expert heatmap per domain, one colour scale for every panel
    grids = {n: [res["domains"][n]["layers"][l]["percent"] for l in moe] for n in names}
    vmax = max((max(map(max, g)) for g in grids.values() if g), default=1.0) or 1.0
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names) + 1, 0.25 * len(moe) + 2.2),
                             squeeze=False, sharey=True)
    im = None
    for ax, name in zip(axes[0], names):
        im = ax.imshow(grids[name], aspect="auto", cmap="viridis", interpolation="nearest",
                       vmin=0.0, vmax=vmax)
        ax.set_title(f"{name} (n = {res['domains'][name]['tokens']} tokens)", fontsize=10)
        ax.set_xlabel("expert id")
        _int_axis(ax.xaxis)
        ax.set_yticks(range(len(moe)))
        ax.set_yticklabels(moe, fontsize=7)
    axes[0, 0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes[0]), label="% of tokens routed to the expert")
    fig.suptitle(f"Share of tokens routed to each expert, every MoE layer{_preset_note(res)}",
                 fontsize=11, y=1.04)
    files.append(_save(fig, out / "routing_overview.png"))
    return files


def plot_early_decode(res: dict, path: str | Path) -> Path:
    layers = res["layers"]
    K = max((len(r.get("cumulative", [])) for r in layers), default=0)
    logit = res.get("score") == "logit"
    v = 3 if logit else 1                      # cell index of the value shown by colour
    cols = (["layer\noutput"] + [f"top {k}\nmixed" for k in range(1, K + 1)]
            + [f"expert\nrank {j}" for j in range(1, K + 1)])
    n_rows = len(layers)
    fig, ax = plt.subplots(figsize=(1.05 * len(cols) + 2.0, 0.42 * n_rows + 2.0))
    grid = [[float("nan")] * len(cols) for _ in range(n_rows)]
    cells = [[None] * len(cols) for _ in range(n_rows)]
    for i, r in enumerate(layers):
        row = [r["layer_out"][0]] + [c[0] for c in r.get("cumulative", [])]
        row += [None] * (K + 1 - len(row)) + [c[0] for c in r.get("single", [])]
        for j, c in enumerate(row):
            if c is not None:
                grid[i][j] = c[v]
                cells[i][j] = c
    vals = [x for row in grid for x in row if x == x]
    vmin, vmax = (min(vals), max(vals)) if logit and vals else (0.0, 1.0)
    im = ax.imshow(grid, cmap="Blues", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1,
                   aspect="auto")
    for i, r in enumerate(layers):
        for j, c in enumerate(cells[i]):
            if c is None:
                continue
            frac = (c[v] - vmin) / (vmax - vmin) if vmax > vmin else 0.0
            colour = "white" if frac > 0.6 else "black"
            ax.text(j, i - 0.1, _short(c[0]), ha="center", va="center", fontsize=7.5,
                    color=colour)
            if j > 0:      # the expert added at this k, or the single expert, with its weight
                slot = j - 1 if j <= K else j - 1 - K
                e, w = r["experts"][slot], r["weights"][slot]
                ax.text(j, i + 0.3, f"e{e} w={w:.2f}", ha="center", va="center", fontsize=5.5,
                        color=colour)
    ax.axvline(0.5, color="black", linewidth=0.8)
    ax.axvline(K + 0.5, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(r["layer"]) for r in layers], fontsize=8)
    ax.set_ylabel("layer")
    toks = res["prompt_tokens"]
    context = "".join(toks[-12:])
    base = "a (residual before the MoE norm)" if res["base"] == "resid_mid" else "u (MoE input)"
    lens_ = "lm_head(final norm(h))" if res["norm"] == "final" else "lm_head(h), no final norm"
    wt = "; expert outputs taken as w·E (as the paper's code ran)" if res.get(
        "weighted_expert_out") else ""
    title = (f"Next token predicted from each layer after {_short(toks[-1], 16)!r}"
             f"{_preset_note(res)}\n"
             f"columns: the layer's output, {base} + the top-k experts' weighted sum, and "
             f"{base} + each chosen expert alone\nlens: {lens_}{wt}; context …{_short(context, 50)}")
    ax.set_title(title, fontsize=8, pad=26)
    fig.colorbar(im, ax=ax, label="top-1 raw logit" if logit else "top-1 probability",
                 fraction=0.04)
    return _save(fig, Path(path))


def plot_topk_sweep(res: dict, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ks = res["ks"]
    ref = str(res["reference_k"])
    for name, d in res["domains"].items():
        y = [d["perplexity"][str(k)] for k in ks]
        line, = ax.plot(ks, y, marker="o",
                        label=f"{name} (n = {d['samples']} samples, {d['tokens']} tokens)")
        for k, val in zip(ks, y):
            if str(k) != ref and val == val:
                pct = d["increase_vs_reference_percent"][str(k)]
                ax.annotate(f"{pct:+.1f}%", (k, val), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=line.get_color())
    ys = [d["perplexity"][str(k)] for d in res["domains"].values() for k in ks]
    ys = [y for y in ys if y == y and y > 0]
    if ys and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("experts per token (top-k) on every MoE layer")
    ax.set_ylabel("perplexity (geometric mean over samples)")
    ax.set_xticks(ks)
    ax.set_title(f"Perplexity when each token uses only its top-k experts\n"
                 f"labels: change vs k = {ref}, the model's own{_preset_note(res)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_similarity(res: dict, path: str | Path) -> Path:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    lo = 1.0
    for name, d in res["domains"].items():
        layers = sorted(d, key=int)
        x = [int(l) for l in layers]
        mean = [d[l]["mean"] for l in layers]
        std = [d[l]["std"] for l in layers]
        n = max((d[l]["count"] for l in layers), default=0)
        line, = ax.plot(x, mean, marker="o", markersize=3, label=f"{name} (n = {n} tokens)")
        ax.fill_between(x, [m - s for m, s in zip(mean, std)],
                        [min(1.0, m + s) for m, s in zip(mean, std)], alpha=0.15,
                        color=line.get_color())
        lo = min([lo] + [m - s for m, s in zip(mean, std) if m == m])
        for metric, style in (("final_vs_top1", "--"), ("final_vs_topk", "-")):
            ys = [d[l][metric]["mean"] if metric in d[l] else math.nan for l in layers]
            ax2.plot(x, ys, style, marker="o", markersize=3, color=line.get_color(),
                     label=f"{name}: {'top-1' if metric.endswith('top1') else 'top-K'}")
            lo = min([lo] + [y for y in ys if y == y])
    for a in (ax, ax2):
        a.set_xlabel("layer")
        _int_axis(a.xaxis)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    ax.set_ylim(max(-1.0, lo - 0.05), 1.01)
    ax.set_ylabel("cosine similarity")
    base = "a" if res["base"] == "resid_mid" else "u"
    pos = "every token" if res["positions"] == "all" else "the last token of each sample"
    ax.set_title(f"Top-1 expert alone vs all top-K experts: cos({base} + top-1, {base} + top-K)"
                 f"\nmean over {pos}; band: ±1 s.d.{_preset_note(res)}", fontsize=9)
    ax2.set_title("The layer's output vs the same two mixtures\n"
                  "dashed: cos(output, top-1), solid: cos(output, top-K)", fontsize=9)
    return _save(fig, Path(path))


def plot_router_stats(res: dict, path: str | Path) -> Path:
    names = list(res["domains"])
    E = res["model"]["experts"]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(5.5 + 4 * len(names), 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    grids = {}
    for name in names:
        d = res["domains"][name]
        layers = sorted(d["layers"], key=int)
        ax.plot([int(l) for l in layers], [d["layers"][l]["entropy_fraction"] for l in layers],
                marker="o", markersize=3, label=f"{name} (n = {d['tokens']} tokens)")
        grids[name] = [d["layers"][l]["mean_prob"] for l in layers]
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    _int_axis(ax.xaxis)
    ax.set_ylabel("router entropy / ln E  (1 = uniform)")
    ax.set_title(f"How spread out the router's probabilities are (E = {E})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    vmax = max((max(map(max, g)) for g in grids.values() if g), default=1.0) or 1.0
    im = None
    for a, name in zip(axes[0, 1:], names):
        layers = sorted(res["domains"][name]["layers"], key=int)
        im = a.imshow(grids[name], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                      interpolation="nearest")
        a.set_yticks(range(len(layers)))
        a.set_yticklabels(layers, fontsize=7)
        a.set_xlabel("expert id")
        _int_axis(a.xaxis)
        a.set_ylabel("layer")
        a.set_title(f"{name}: mean router probability", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0, 1:]), label="mean router probability")
    fig.suptitle("Router entropy and mean router probability per layer", fontsize=11, y=1.02)
    return _save(fig, Path(path))


def plot_coactivation(res: dict, out_dir: str | Path, layers=None) -> list[Path]:
    import numpy as np
    out = Path(out_dir)
    names = list(res["domains"])
    all_layers = sorted(next(iter(res["domains"].values()))["layers"], key=int) if names else []
    layers = all_layers if layers is None else [str(l) for l in layers]
    files = []
    for l in layers:
        lifts = {}
        for name in names:
            d = res["domains"][name]
            c = np.array(d["layers"][l], dtype=np.float64)
            h = np.diag(c)
            with np.errstate(divide="ignore", invalid="ignore"):
                lift = c * d["tokens"] / np.outer(h, h)
            np.fill_diagonal(lift, np.nan)
            lifts[name] = lift
        vals = [v for x in lifts.values() for v in x[np.isfinite(x)].ravel()]
        vmax = max(vals) if vals else 1.0
        fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names) + 1, 4.2),
                                 squeeze=False)
        im = None
        for a, name in zip(axes[0], names):
            im = a.imshow(lifts[name], cmap="magma", vmin=0.0, vmax=max(vmax, 1.0),
                          interpolation="nearest")
            a.set_title(f"{name} (n = {res['domains'][name]['tokens']} tokens)", fontsize=9)
            a.set_xlabel("expert j")
            a.set_ylabel("expert i")
            _int_axis(a.xaxis)
            _int_axis(a.yaxis)
        fig.colorbar(im, ax=list(axes[0]), label="lift: P(i and j) / (P(i) P(j))")
        fig.suptitle(f"Which experts fire together, layer {l} (lift 1 = independent; blank = "
                     f"never chosen)", fontsize=10, y=1.03)
        files.append(_save(fig, out / f"coactivation_layer{int(l):02d}.png"))
    return files


def plot_vocab(res: dict, out_dir: str | Path, experts: int = 12) -> list[Path]:
    out = Path(out_dir)
    files = []
    for l, per_expert in res["layers"].items():
        used = sorted(range(len(per_expert)), key=lambda e: -sum(t[2] for t in per_expert[e]))
        used = [e for e in used if per_expert[e]][:experts]
        fig, ax = plt.subplots(figsize=(11, 0.18 * max(len(used), 1) + 0.9))
        ax.axis("off")
        lines = [f"expert {e:>3}:  " + "   ".join(f"{_short(t[0], 12)} x{t[2]} ({100 * t[3]:.0f}%)"
                                                  for t in per_expert[e][:6]) for e in used]
        ax.text(0.0, 1.0, "\n".join(lines) or "no tokens", va="top", ha="left",
                family="monospace", fontsize=8, transform=ax.transAxes)
        ax.set_title(f"Tokens routed most often to each of the {len(used)} busiest experts, "
                     f"layer {l}\n(count; % = share of that token's occurrences sent to the "
                     f"expert; n = {res['tokens']} tokens)", fontsize=9, loc="left")
        files.append(_save(fig, out / f"vocab_layer{int(l):02d}.png"))
    return files
