"""Long-format CSV of every lens result (one row per domain x layer x expert ..., one value per
column), written beside its JSON so a spreadsheet or pandas reads it without parsing JSON:

    routing        domain, layer, expert, hits, percent, tokens, denominator
    early-decode   label, position, layer, column, expert, weight, rank, token, token_id, prob, logit
    topk-sweep     domain, k, samples, tokens, perplexity, mean_perplexity, ... (one row per k)
                   and <stem>_samples.csv: domain, k, sample, perplexity
    similarity     domain, layer, metric, mean, std, count
    router-stats   domain, layer, entropy_mean, entropy_std, entropy_fraction, topk_mass
                   and <stem>_mean_prob.csv: domain, layer, expert, mean_prob
    coactivation   domain, layer, expert_i, expert_j (i <= j, non-zero only), count, lift
    vocab          layer, expert, rank, token, token_id, count, share

`csv_tables(res)` returns {file suffix: (header, rows)}; `write_csv(stem, res)` writes them as
`<stem>.csv` (and `<stem>_<suffix>.csv` for extra tables) and returns the paths.
"""
from __future__ import annotations

import csv
from pathlib import Path

from .files import atomic_write

Table = tuple[list[str], list[list]]


def _routing(res: dict) -> dict[str, Table]:
    head = ["domain", "layer", "expert", "hits", "percent", "tokens", "denominator"]
    rows = []
    for name, d in res["domains"].items():
        den = d.get("denominator", d["tokens"])
        for l, layer in d["layers"].items():
            for e, (h, p) in enumerate(zip(layer["hits"], layer["percent"])):
                rows.append([name, int(l), e, h, p, d["tokens"], den])
    return {"": (head, rows)}


def _early(res: dict) -> dict[str, Table]:
    head = ["label", "position", "layer", "column", "expert", "weight", "rank", "token",
            "token_id", "prob", "logit"]
    rows = []
    results = res["results"] if "results" in res else [res]
    for r in results:
        for row in r["layers"]:
            cols = [("layer_out", None, None, row["layer_out"])]
            ex, ws = row.get("experts", []), row.get("weights", [])
            for k, cells in enumerate(row.get("cumulative", []), 1):
                cols.append((f"k={k}", ex[k - 1], ws[k - 1], cells))
            for j, cells in enumerate(row.get("single", [])):
                cols.append((f"single{j + 1}", ex[j], ws[j], cells))
            for col, e, w, cells in cols:
                for rank, c in enumerate(cells, 1):
                    rows.append([r.get("label"), r["position"], row["layer"], col, e, w, rank,
                                 c[0], c[2], c[1], c[3] if len(c) > 3 else ""])
    return {"": (head, rows)}


_SWEEP = ["perplexity", "mean_perplexity", "increase_vs_reference_percent",
          "log_perplexity_ratio", "minmax_log_perplexity", "minmax_mean_perplexity"]


def _sweep(res: dict) -> dict[str, Table]:
    head = ["domain", "k", "samples", "tokens", *_SWEEP]
    rows, samples = [], []
    for name, d in res["domains"].items():
        for k in res["ks"]:
            rows.append([name, k, d["samples"], d["tokens"], *(d[f][str(k)] for f in _SWEEP)])
            for i, p in enumerate(d["per_sample_perplexity"][str(k)]):
                samples.append([name, k, i, p])
    return {"": (head, rows), "samples": (["domain", "k", "sample", "perplexity"], samples)}


def _similarity(res: dict) -> dict[str, Table]:
    head = ["domain", "layer", "metric", "mean", "std", "count"]
    rows = []
    for name, d in res["domains"].items():
        for l, v in d.items():
            rows.append([name, int(l), "top1_vs_topk", v["mean"], v["std"], v["count"]])
            for m in ("final_vs_top1", "final_vs_topk"):
                if m in v:
                    rows.append([name, int(l), m, v[m]["mean"], v[m]["std"], v["count"]])
    return {"": (head, rows)}


def _router_stats(res: dict) -> dict[str, Table]:
    head = ["domain", "layer", "entropy_mean", "entropy_std", "entropy_fraction", "topk_mass"]
    rows, probs = [], []
    for name, d in res["domains"].items():
        for l, v in d["layers"].items():
            rows.append([name, int(l), *(v[k] for k in head[2:])])
            for e, x in enumerate(v["mean_prob"]):
                probs.append([name, int(l), e, x])
    return {"": (head, rows), "mean_prob": (["domain", "layer", "expert", "mean_prob"], probs)}


def _coactivation(res: dict) -> dict[str, Table]:
    head = ["domain", "layer", "expert_i", "expert_j", "count", "lift"]
    rows = []
    for name, d in res["domains"].items():
        n = d["tokens"]
        for l, c in d["layers"].items():
            for i, row in enumerate(c):
                for j in range(i, len(row)):
                    if row[j]:
                        lift = row[j] * n / (c[i][i] * c[j][j])
                        rows.append([name, int(l), i, j, row[j], lift])
    return {"": (head, rows)}


def _vocab(res: dict) -> dict[str, Table]:
    head = ["layer", "expert", "rank", "token", "token_id", "count", "share"]
    rows = []
    for l, experts in res["layers"].items():
        for e, toks in enumerate(experts):
            for rank, (text, i, n, share) in enumerate(toks, 1):
                rows.append([int(l), e, rank, text, i, n, share])
    return {"": (head, rows)}


def _generic(res: dict) -> dict[str, Table]:
    """Results that carry their own long table: {"columns": [...], "rows": [[...], ...]}
    (and optionally "tables": {suffix: {"columns", "rows"}})."""
    out = {"": (res["columns"], res["rows"])}
    for suffix, t in res.get("tables", {}).items():
        out[suffix] = (t["columns"], t["rows"])
    return out


_BY_ANALYSIS = {"routing": _routing, "early-decode": _early, "topk-sweep": _sweep,
                "similarity": _similarity, "router-stats": _router_stats,
                "coactivation": _coactivation, "vocab": _vocab}


def csv_tables(res: dict) -> dict[str, Table]:
    kind = res.get("analysis")
    if kind in _BY_ANALYSIS:
        return _BY_ANALYSIS[kind](res)
    if "columns" in res and "rows" in res:
        return _generic(res)
    raise ValueError(f"no CSV layout for analysis {kind!r}")


def _write_table(path: Path, head, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows(rows)


def write_csv(stem: str | Path, res: dict) -> list[Path]:
    """Write `<stem>.csv` (+ `<stem>_<suffix>.csv`) for a result's JSON dict."""
    stem = Path(stem)
    files = []
    for suffix, (head, rows) in csv_tables(res).items():
        path = stem.with_name(stem.name + (f"_{suffix}" if suffix else "") + ".csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        files.append(atomic_write(path, lambda tmp, head=head, rows=rows: _write_table(tmp, head, rows)))
    return files
