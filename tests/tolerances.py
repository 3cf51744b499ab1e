"""The one tolerance table of the test suite: (what, dtype) -> (atol, rtol).

Why these numbers:
- data movement (align, ids) is compared bit for bit; it has no entry here.
- route weights are fp32 softmax probabilities; kernels may use exp approximations or another
  summation order: 1e-6 absolute.
- expert_ffn / combine in bf16: inputs ~N(0, 0.1), fp32 accumulation, outputs rounded to bf16
  (one bf16 step is 2^-8 relative): atol 2e-2, rtol 2e-2 (vLLM's bar), plus the global metric
  below, which catches a wrong row that the element-wise bound would forgive.
- model logits: fp32 runs the same math in another order (SDPA vs explicit softmax,
  fp32 vs ascending-expert accumulation): 1e-4. bf16: the oracle follows the remote code
  (bf16 router softmax, bf16 accumulation in expert order) while the engine uses fp32; logits
  move by a few bf16 steps of the logit scale, and near-ties may pick another expert.
"""
import torch

TOL = {
    ("route_weights", torch.float32): (1e-6, 1e-5),
    ("expert_ffn", torch.float32): (1e-5, 1e-5),
    ("expert_ffn", torch.bfloat16): (2e-2, 2e-2),
    ("combine", torch.float32): (1e-6, 1e-6),
    ("combine", torch.bfloat16): (1e-2, 1e-2),
    ("attention_decode", torch.float32): (1e-5, 1e-5),
    ("attention_decode", torch.bfloat16): (1e-2, 1e-2),
    # rms_norm: the fp32 mean of squares in another summation order, then the normalised x and
    # the product with w each rounded to the dtype: fp32 to rounding, bf16 within two bf16 steps.
    ("rms_norm", torch.float32): (1e-5, 1e-5),
    ("rms_norm", torch.bfloat16): (1e-2, 1e-2),
    ("model_logits", torch.float32): (1e-4, 1e-4),
    ("model_logits", torch.bfloat16): (1.5e-1, 5e-2),
    ("model_logits_vs_backend", torch.float32): (1e-4, 1e-4),
    ("model_logits_vs_backend", torch.bfloat16): (1e-1, 5e-2),
    # expert parallel vs one process (logits, taps): the same kernels on the same rows, but each
    # expert's rows arrive in another grouping (the exchange), so a GEMM may round differently.
    ("expert_parallel", torch.float32): (1e-5, 1e-5),
    ("expert_parallel", torch.bfloat16): (1e-1, 5e-2),
    # lens tap invariants (resid_post = resid_mid + routed + shared, ...): each side was rounded
    # to the model dtype separately, so they agree to a few roundings of that dtype.
    ("tap_invariant", torch.float32): (1e-5, 1e-5),
    ("tap_invariant", torch.bfloat16): (2e-2, 2e-2),
    # lens known answers (closed forms in float64) vs the engine: fp32 to rounding; bf16 carries
    # ~3 significant digits through the residual, the experts and lm_head.
    ("lens_known_answer", torch.float32): (1e-6, 1e-5),
    ("lens_known_answer", torch.bfloat16): (5e-3, 3e-2),
    # The emulated C++ kernel programs (tests/emu/cpp) check against a reference in double of the
    # same inputs. bf16 kernel outputs (expert GEMM, decode, shared expert): weights ~N(0, 1/K),
    # so every output is O(1) at any reduction length K and one absolute bound means the same
    # thing everywhere; the intermediate's one bf16 rounding dominates.
    ("kernel_vs_double", torch.bfloat16): (2e-2, 1e-2),
    # an fp32 sum against the same sum in double (combine before its one rounding to the output
    # dtype, the emulated mma's fp32 accumulation): a few fp32 roundings of the magnitude.
    ("fp32_sum_vs_double", torch.float32): (1e-5, 1e-5),
}

# Global similarity bar for bf16 tensors (DeepGEMM's 1 - 2*sum(xy)/sum(x^2+y^2)).
GLOBAL_DIFF = {torch.float32: 1e-8, torch.bfloat16: 1e-4}
# ... and for a bf16 kernel against the double reference ("kernel_vs_double"), which has no
# second rounding order to forgive.
GLOBAL_DIFF_VS_DOUBLE = 1e-5


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return 0.0 if denom == 0 else float(1 - 2 * (x * y).sum() / denom)


def assert_close(actual, expected, what: str, dtype: torch.dtype, case: str = ""):
    atol, rtol = TOL[(what, dtype)]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} [{case}] dtype={dtype}: {m}")
    d = calc_diff(actual, expected)
    assert d <= GLOBAL_DIFF[dtype], f"{what} [{case}] dtype={dtype}: global diff {d:.3g} > {GLOBAL_DIFF[dtype]}"


HEADER = "test_tolerances.h"


def cpp_header() -> str:
    """This table as C++ constants for the emulated kernel programs (tests/emu/cpp), which include
    test_tolerances.h: tests/emu/emu_harness.py writes it into its build directory; for a build
    by hand, `python tests/tolerances.py > DIR/test_tolerances.h` and compile with -I DIR."""
    short = {torch.float32: "f32", torch.bfloat16: "bf16"}
    lines = ["// Generated from tests/tolerances.py (cpp_header); edit that table, not this file.",
             "#pragma once", "", "#include <cmath>", "", "namespace moe_test::tol {", "",
             "struct Tol {  // |got - want| <= atol + rtol |want|, as assert_close; NaN fails",
             "  double atol, rtol;",
             "  bool ok(double got, double want) const { return std::fabs(got - want) <= atol + rtol * std::fabs(want); }",
             "};", ""]
    for (what, dtype), (atol, rtol) in TOL.items():
        lines.append(f"constexpr Tol {what}_{short[dtype]}{{{atol!r}, {rtol!r}}};")
    lines.append("")
    for dtype, d in GLOBAL_DIFF.items():
        lines.append(f"constexpr double global_diff_{short[dtype]} = {d!r};")
    lines += [f"constexpr double global_diff_vs_double = {GLOBAL_DIFF_VS_DOUBLE!r};", "",
              "}  // namespace moe_test::tol", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(cpp_header(), end="")
