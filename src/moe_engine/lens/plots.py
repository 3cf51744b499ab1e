"""PNG plots of the lens analyses, drawn from their JSON (so a saved result can be re-plotted),
in the style of the MoE Lens figures:

    plot_routing        per layer: one bar panel per domain, percent of tokens per expert, red
                        dashed uniform baseline k/E (paper Fig. 1, 4, 5); plus a layer x expert
                        heatmap per domain
    plot_early_decode   layers x (layer output, k = 1..K) table of top-1 tokens, colour = prob,
                        expert id and weight in each k cell (Fig. 2)
    plot_topk_sweep     normalised log-perplexity vs k, one line per domain (Fig. 3 left)
    plot_similarity     cos(H^{l_1}, H^{l_K}) per layer, one line per domain (Fig. 3 right)

Each returns the list of files written. matplotlib runs headless (Agg).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 120


def _short(token: str, width: int = 10) -> str:
    s = token.replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")
    s = s if s.strip() else repr(token)[1:-1] or "␣"
    return s if len(s) <= width else s[:width - 1] + "…"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


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
                                 sharex=True, squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            pct = res["domains"][name]["layers"][l]["percent"]
            ax.bar(x, pct, color="tab:blue", width=0.8)
            ax.axhline(res["uniform_percent"][l], color="red", linestyle="--", linewidth=1.2,
                       label=f"uniform ({res['uniform_percent'][l]:.2f}%)")
            half = res["domains"][name]["layers"][l]["experts_for_half"]
            ax.set_title(f"{name}: {res['domains'][name]['tokens']} tokens, "
                         f"{half} expert(s) take half the routing decisions", fontsize=9)
            ax.set_ylabel("% of tokens")
            ax.legend(loc="upper right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[-1, 0].set_xlabel("expert id")
        if E <= 64:
            axes[-1, 0].set_xticks(x[::max(1, E // 16)])
        fig.suptitle(f"Expert routing, layer {l} (top-{res['topk'][int(l)]} of {E})", fontsize=11)
        files.append(_save(fig, out / f"routing_layer{int(l):02d}.png"))
    # overview: layer x expert heatmap per domain
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 0.25 * len(moe) + 2.2),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = [res["domains"][name]["layers"][l]["percent"] for l in moe]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("expert id")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(moe)))
        ax.set_yticklabels(moe, fontsize=7)
        fig.colorbar(im, ax=ax, label="% of tokens")
    fig.suptitle("Routing percentage per layer and expert", fontsize=11, y=1.04)
    files.append(_save(fig, out / "routing_overview.png"))
    return files


def plot_early_decode(res: dict, path: str | Path) -> Path:
    layers = res["layers"]
    K = max((len(r.get("cumulative", [])) for r in layers), default=0)
    cols = ["layer out"] + [f"k={k}" for k in range(1, K + 1)]
    n_rows = len(layers)
    fig, ax = plt.subplots(figsize=(1.25 * len(cols) + 1.5, 0.42 * n_rows + 1.6))
    probs = [[float("nan")] * len(cols) for _ in range(n_rows)]
    for i, r in enumerate(layers):
        probs[i][0] = r["layer_out"][0][1]
        for k, cell in enumerate(r.get("cumulative", [])):
            probs[i][k + 1] = cell[0][1]
    im = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for i, r in enumerate(layers):
        cells = [r["layer_out"][0]] + [c[0] for c in r.get("cumulative", [])]
        for j, (tok, p, *_) in enumerate(cells):
            colour = "white" if p > 0.6 else "black"
            ax.text(j, i - 0.08, _short(tok), ha="center", va="center", fontsize=8, color=colour)
            if j > 0:  # the expert added at this k, with its weight
                e, w = r["experts"][j - 1], r["weights"][j - 1]
                ax.text(j, i + 0.3, f"e{e}  w={w:.2f}", ha="center", va="center", fontsize=5.5,
                        color=colour)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(r["layer"]) for r in layers], fontsize=8)
    ax.set_ylabel("layer")
    toks = res["prompt_tokens"]
    context = "".join(toks[-12:])
    title = (f"Early decoding ({res['preset']}; norm={res['norm']}, base={res['base']}) "
             f"after {_short(toks[-1], 16)!r}\n…{_short(context, 60)}")
    ax.set_title(title, fontsize=9, pad=22)
    fig.colorbar(im, ax=ax, label="top-1 probability", fraction=0.04)
    return _save(fig, Path(path))


def plot_topk_sweep(res: dict, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = res["ks"]
    for name, d in res["domains"].items():
        ax.plot(ks, [d["perplexity"][str(k)] for k in ks], marker="o", label=name)
    ax.set_xlabel("top-k experts per token")
    ax.set_ylabel("perplexity")
    ax.set_xticks(ks)
    ax.set_title("Perplexity vs top-k", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_similarity(res: dict, path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    lo = 1.0
    for name, d in res["domains"].items():
        layers = sorted(d, key=int)
        mean = [d[l]["mean"] for l in layers]
        std = [d[l]["std"] for l in layers]
        x = [int(l) for l in layers]
        ax.plot(x, mean, marker="o", markersize=3, label=name)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)],
                        [min(1.0, m + s) for m, s in zip(mean, std)], alpha=0.15)
        lo = min([lo] + [m - s for m, s in zip(mean, std) if m == m])
    ax.set_ylim(max(-1.0, lo - 0.05), 1.01)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"cos($H^{\ell_1}$, $H^{\ell_K}$)")
    ax.set_title(f"Single vs ensemble experts ({res['preset']}: base={res['base']}, "
                 f"positions={res['positions']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))
