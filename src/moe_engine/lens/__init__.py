"""MoE Lens: the analyses of "MoE Lens -- An Expert Is All You Need" on any DeepSeekMoE
checkpoint, built on the engine's taps (docs/lens.md).

    import moe_engine
    from moe_engine import lens
    model = moe_engine.load(backend="auto")                  # the bundled small model
    r = lens.route_corpus(model, {"en": "data/en.txt", "code": "data/code/"})
    lens.plot_routing(r.to_json(), "out/")
    e = lens.early_decode(model, "When datasets are sufficiently large, increasing")
    s = lens.topk_sweep(model, ["data/en.txt"], ks=[1, 2, 3, 4, 5, 6])
    c = lens.similarity(model, ["data/en.txt"], preset="paper")

    cap = moe_engine.Capture(moe_engine.TapRequest(lens.lens_tap_names()))
    model.forward(ids, capture=cap)
    H = lens.cumulative(cap, layer=3)                        # [N, K, D]  H^{l_k}, k = 1..K
    out = lens.logit_lens(model, H, top=5)                   # out.top_ids / top_probs [N, K, 5]

The command line runs the same analyses and writes JSON + PNG: python -m moe_engine.lens --help.
"""
from .analyses import (PRESETS, EarlyDecodeResult, LayerStream, Preset, RoutingResult,
                       SimilarityResult, TopkSweepResult, document_samples, early_decode,
                       get_preset, route_corpus, similarity, topk_sweep)
from .attribution import ExpertAttribution, attribute_experts
from .capture import capture_corpus
from .corpus import Domain, as_domains, domain_from_path, iter_batches, iter_samples
from .decode import (ExpertView, LensOutput, cumulative, expert_view, lens_tap_names, logit_lens,
                     single, token_text)
from .export import csv_tables, write_csv
from .plots import (plot_coactivation, plot_early_decode, plot_router_stats, plot_routing,
                    plot_similarity, plot_topk_sweep, plot_vocab)
from .stats import (CoactivationResult, RouterStatsResult, VocabResult, coactivation,
                    router_stats, vocab)
from .store import TapWriter, iter_taps, read_taps

__all__ = ["PRESETS", "Domain", "EarlyDecodeResult", "ExpertView", "LayerStream", "LensOutput",
           "Preset", "RoutingResult", "SimilarityResult", "TapWriter", "TopkSweepResult",
           "as_domains", "cumulative", "domain_from_path", "early_decode", "expert_view",
           "get_preset", "iter_batches", "iter_samples", "iter_taps", "lens_tap_names",
           "logit_lens", "plot_early_decode", "plot_routing", "plot_similarity", "plot_topk_sweep",
           "read_taps", "route_corpus", "similarity", "single", "token_text", "topk_sweep",
           "csv_tables", "write_csv", "document_samples", "CoactivationResult",
           "RouterStatsResult", "VocabResult", "coactivation", "router_stats", "vocab",
           "plot_router_stats", "plot_coactivation", "plot_vocab", "ExpertAttribution",
           "attribute_experts", "capture_corpus"]
