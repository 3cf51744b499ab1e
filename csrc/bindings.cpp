// The only pybind11 file: exposes the Params structs of ops.h and the launchers. No logic
// (decode_step's two entries only point the struct at a DecodeLayers vector) beyond the argument
// checks of the size helpers, which the kernels' own checks do not cover: they are plain
// arithmetic, and a negative size or a zero divisor would return a negative or garbage size
// that a caller might allocate.
// Built twice: as moe_engine._C (CPU kernels, + CUDA kernels when MOE_WITH_CUDA) and as
// moe_engine._C_emu (the CUDA kernels compiled through csrc/emu; MOE_EMU).
// Pointer fields are set from Python ints (tensor.data_ptr()).
#include <pybind11/pybind11.h>
#include <pybind11/stl_bind.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops.h"
#if !defined(MOE_EMU)
#include "cpu/simd.h"
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(MOE_WITH_CUDA) && !defined(MOE_EMU)
#include <cuda_runtime_api.h>
#endif

// DecodeLayers: a C++ vector built once per model, passed to decode_step by reference (no
// per-step list conversion).
PYBIND11_MAKE_OPAQUE(std::vector<moe::DecodeLayer>)

namespace py = pybind11;
using namespace moe;

#define MOE_PTR(cls, S, f)                                                      \
  cls.def_property(                                                             \
      #f, [](const S& s) { return reinterpret_cast<std::uintptr_t>(s.f); },    \
      [](S& s, std::uintptr_t v) { s.f = reinterpret_cast<decltype(S::f)>(v); })
#define MOE_VAL(cls, S, f) cls.def_readwrite(#f, &S::f)
// Refuse a size helper's argument below its minimum, naming it: sizes({{"T", T, 0}, ...}, "op").
struct SizeArg { const char* name; int64_t value; int64_t min; };
static void sizes(const char* op, std::initializer_list<SizeArg> args) {
  for (const SizeArg& a : args)
    if (a.value < a.min)
      throw std::invalid_argument(std::string(op) + ": " + a.name + "=" + std::to_string(a.value) +
                                  ", expected >= " + std::to_string(a.min));
}
[[maybe_unused]] static void qformat(const char* op, const QFormat& f) {
  sizes(op, {{"fmt.bits", f.bits, 1}, {"fmt.group_size", f.group_size, 1}});
}

#define MOE_STREAM(fn, P) \
  [](const P& p, std::uintptr_t stream, int device) { fn(p, reinterpret_cast<void*>(stream), device); }

PYBIND11_MODULE(MOE_MODULE_NAME, m) {
  // module_local: _C and _C_emu register the same C++ types in one process.
  py::enum_<DType>(m, "DType", py::module_local()).value("f32", DType::f32).value("bf16", DType::bf16);
  py::enum_<MaskMode>(m, "MaskMode", py::module_local())
      .value("reroute", MaskMode::reroute)
      .value("zero", MaskMode::zero);

  py::class_<RouteParams> route(m, "RouteParams", py::module_local());
  route.def(py::init<>());
  MOE_PTR(route, RouteParams, router_logits); MOE_VAL(route, RouteParams, logits_dtype);
  MOE_VAL(route, RouteParams, logits_stride); MOE_VAL(route, RouteParams, T);
  MOE_VAL(route, RouteParams, E); MOE_VAL(route, RouteParams, k_max); MOE_PTR(route, RouteParams, k);
  MOE_PTR(route, RouteParams, expert_mask); MOE_VAL(route, RouteParams, mask_stride);
  MOE_VAL(route, RouteParams, mask_mode); MOE_VAL(route, RouteParams, force_stride);
  MOE_PTR(route, RouteParams, force_expert); MOE_VAL(route, RouteParams, renormalize);
  MOE_PTR(route, RouteParams, topk_ids); MOE_PTR(route, RouteParams, topk_weights);
  MOE_PTR(route, RouteParams, router_probs); MOE_PTR(route, RouteParams, usage_counts);

  py::class_<AlignParams> align(m, "AlignParams", py::module_local());
  align.def(py::init<>());
  MOE_PTR(align, AlignParams, topk_ids); MOE_VAL(align, AlignParams, T); MOE_VAL(align, AlignParams, k_max);
  MOE_VAL(align, AlignParams, E); MOE_VAL(align, AlignParams, block_m);
  MOE_PTR(align, AlignParams, expert_counts); MOE_PTR(align, AlignParams, expert_offsets);
  MOE_PTR(align, AlignParams, sorted_slots); MOE_PTR(align, AlignParams, tile_experts);
  MOE_PTR(align, AlignParams, num_padded); MOE_PTR(align, AlignParams, workspace);
  m.def("align_capacity", [](int64_t T, int64_t k_max, int64_t E, int64_t block_m) {
    sizes("align_capacity", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}, {"block_m", block_m, 1}});
    return align_capacity(T, k_max, E, block_m);
  });
  m.def("align_workspace_size", [](int64_t T, int64_t k_max, int64_t E) {
    sizes("align_workspace_size", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}});
    return align_workspace_size(T, k_max, E);
  });

  py::class_<CombineParams> combine(m, "CombineParams", py::module_local());
  combine.def(py::init<>());
  MOE_PTR(combine, CombineParams, expert_out); MOE_PTR(combine, CombineParams, topk_weights);
  MOE_PTR(combine, CombineParams, topk_ids); MOE_PTR(combine, CombineParams, shared_out);
  MOE_PTR(combine, CombineParams, residual); MOE_PTR(combine, CombineParams, out);
  MOE_PTR(combine, CombineParams, routed_out); MOE_VAL(combine, CombineParams, dtype);
  MOE_VAL(combine, CombineParams, T); MOE_VAL(combine, CombineParams, k_max); MOE_VAL(combine, CombineParams, D);

  py::class_<PackParams> pack(m, "PackParams", py::module_local());
  pack.def(py::init<>());
  MOE_PTR(pack, PackParams, src); MOE_PTR(pack, PackParams, dst); MOE_VAL(pack, PackParams, dtype);
  MOE_VAL(pack, PackParams, E); MOE_VAL(pack, PackParams, N); MOE_VAL(pack, PackParams, K);
  MOE_VAL(pack, PackParams, gate_up);

  py::class_<ExpertFFNParams> ffn(m, "ExpertFFNParams", py::module_local());
  ffn.def(py::init<>());
  MOE_PTR(ffn, ExpertFFNParams, x); MOE_PTR(ffn, ExpertFFNParams, w13); MOE_PTR(ffn, ExpertFFNParams, w2);
  MOE_PTR(ffn, ExpertFFNParams, topk_ids); MOE_PTR(ffn, ExpertFFNParams, expert_out);
  MOE_PTR(ffn, ExpertFFNParams, workspace); MOE_VAL(ffn, ExpertFFNParams, dtype);
  MOE_VAL(ffn, ExpertFFNParams, T); MOE_VAL(ffn, ExpertFFNParams, k_max); MOE_VAL(ffn, ExpertFFNParams, D);
  MOE_VAL(ffn, ExpertFFNParams, F); MOE_VAL(ffn, ExpertFFNParams, E);

  py::class_<LinearParams> linear(m, "LinearParams", py::module_local());
  linear.def(py::init<>());
  MOE_PTR(linear, LinearParams, x); MOE_PTR(linear, LinearParams, w); MOE_PTR(linear, LinearParams, y);
  MOE_VAL(linear, LinearParams, dtype); MOE_VAL(linear, LinearParams, T); MOE_VAL(linear, LinearParams, N);
  MOE_VAL(linear, LinearParams, K);

  py::class_<ExpertGemmParams> gemm(m, "ExpertGemmParams", py::module_local());
  gemm.def(py::init<>());
  MOE_PTR(gemm, ExpertGemmParams, a); MOE_VAL(gemm, ExpertGemmParams, a_stride);
  MOE_PTR(gemm, ExpertGemmParams, w); MOE_PTR(gemm, ExpertGemmParams, c);
  MOE_PTR(gemm, ExpertGemmParams, sorted_slots); MOE_PTR(gemm, ExpertGemmParams, tile_experts);
  MOE_PTR(gemm, ExpertGemmParams, num_padded); MOE_VAL(gemm, ExpertGemmParams, T);
  MOE_VAL(gemm, ExpertGemmParams, k_max); MOE_VAL(gemm, ExpertGemmParams, E); MOE_VAL(gemm, ExpertGemmParams, D);
  MOE_VAL(gemm, ExpertGemmParams, F); MOE_VAL(gemm, ExpertGemmParams, capacity);
  MOE_VAL(gemm, ExpertGemmParams, block_m); MOE_VAL(gemm, ExpertGemmParams, up);
  MOE_PTR(gemm, ExpertGemmParams, topk_ids);

  py::class_<MoeDecodeParams> dec(m, "MoeDecodeParams", py::module_local());
  dec.def(py::init<>());
  MOE_PTR(dec, MoeDecodeParams, x); MOE_PTR(dec, MoeDecodeParams, topk_ids);
  MOE_PTR(dec, MoeDecodeParams, experts_gate_up); MOE_PTR(dec, MoeDecodeParams, experts_down);
  MOE_PTR(dec, MoeDecodeParams, act); MOE_PTR(dec, MoeDecodeParams, expert_out);
  MOE_VAL(dec, MoeDecodeParams, T); MOE_VAL(dec, MoeDecodeParams, k_max); MOE_VAL(dec, MoeDecodeParams, E);
  MOE_VAL(dec, MoeDecodeParams, D); MOE_VAL(dec, MoeDecodeParams, F);

  py::class_<SharedExpertParams> shared(m, "SharedExpertParams", py::module_local());
  shared.def(py::init<>());
  MOE_PTR(shared, SharedExpertParams, x); MOE_VAL(shared, SharedExpertParams, x_stride);
  MOE_PTR(shared, SharedExpertParams, gate_up); MOE_PTR(shared, SharedExpertParams, down);
  MOE_PTR(shared, SharedExpertParams, act); MOE_PTR(shared, SharedExpertParams, shared_out);
  MOE_VAL(shared, SharedExpertParams, T); MOE_VAL(shared, SharedExpertParams, D); MOE_VAL(shared, SharedExpertParams, S);
  py::class_<MoELayerParams> layer(m, "MoELayerParams", py::module_local());
  layer.def(py::init<>());
  MOE_PTR(layer, MoELayerParams, x); MOE_PTR(layer, MoELayerParams, residual); MOE_PTR(layer, MoELayerParams, router);
  MOE_PTR(layer, MoELayerParams, w13); MOE_PTR(layer, MoELayerParams, w2);
  MOE_PTR(layer, MoELayerParams, shared_w13); MOE_PTR(layer, MoELayerParams, shared_w2);
  MOE_PTR(layer, MoELayerParams, k); MOE_PTR(layer, MoELayerParams, expert_mask); MOE_VAL(layer, MoELayerParams, mask_mode);
  MOE_PTR(layer, MoELayerParams, force_expert); MOE_VAL(layer, MoELayerParams, renormalize);
  MOE_VAL(layer, MoELayerParams, mask_stride); MOE_VAL(layer, MoELayerParams, force_stride);
  MOE_PTR(layer, MoELayerParams, router_logits); MOE_PTR(layer, MoELayerParams, topk_ids);
  MOE_PTR(layer, MoELayerParams, topk_weights); MOE_PTR(layer, MoELayerParams, router_probs);
  MOE_PTR(layer, MoELayerParams, usage_counts); MOE_PTR(layer, MoELayerParams, expert_out);
  MOE_PTR(layer, MoELayerParams, shared_out); MOE_PTR(layer, MoELayerParams, shared_ids);
  MOE_PTR(layer, MoELayerParams, routed_out); MOE_PTR(layer, MoELayerParams, out);
  MOE_PTR(layer, MoELayerParams, workspace); MOE_VAL(layer, MoELayerParams, dtype);
  MOE_VAL(layer, MoELayerParams, T); MOE_VAL(layer, MoELayerParams, D); MOE_VAL(layer, MoELayerParams, E);
  MOE_VAL(layer, MoELayerParams, F); MOE_VAL(layer, MoELayerParams, S); MOE_VAL(layer, MoELayerParams, k_max);

  py::class_<AttnDecodeParams> attn(m, "AttnDecodeParams", py::module_local());
  attn.def(py::init<>());
  MOE_PTR(attn, AttnDecodeParams, q); MOE_PTR(attn, AttnDecodeParams, k_cache); MOE_PTR(attn, AttnDecodeParams, v_cache);
  MOE_PTR(attn, AttnDecodeParams, valid); MOE_PTR(attn, AttnDecodeParams, out); MOE_PTR(attn, AttnDecodeParams, workspace);
  MOE_VAL(attn, AttnDecodeParams, scale); MOE_VAL(attn, AttnDecodeParams, dtype); MOE_VAL(attn, AttnDecodeParams, B);
  MOE_VAL(attn, AttnDecodeParams, H); MOE_VAL(attn, AttnDecodeParams, Hkv); MOE_VAL(attn, AttnDecodeParams, hd);
  MOE_VAL(attn, AttnDecodeParams, S); MOE_VAL(attn, AttnDecodeParams, S_cap); MOE_VAL(attn, AttnDecodeParams, valid_stride);

  py::class_<AttnBlockParams> ablk(m, "AttnBlockParams", py::module_local());
  ablk.def(py::init<>());
  MOE_PTR(ablk, AttnBlockParams, x); MOE_PTR(ablk, AttnBlockParams, qkv); MOE_PTR(ablk, AttnBlockParams, o);
  MOE_PTR(ablk, AttnBlockParams, cos); MOE_PTR(ablk, AttnBlockParams, sin); MOE_PTR(ablk, AttnBlockParams, k_cache);
  MOE_PTR(ablk, AttnBlockParams, v_cache); MOE_PTR(ablk, AttnBlockParams, valid); MOE_PTR(ablk, AttnBlockParams, qkv_buf);
  MOE_PTR(ablk, AttnBlockParams, attn_buf); MOE_PTR(ablk, AttnBlockParams, scores); MOE_PTR(ablk, AttnBlockParams, out);
  MOE_VAL(ablk, AttnBlockParams, scale); MOE_VAL(ablk, AttnBlockParams, dtype); MOE_VAL(ablk, AttnBlockParams, B);
  MOE_VAL(ablk, AttnBlockParams, D); MOE_VAL(ablk, AttnBlockParams, H); MOE_VAL(ablk, AttnBlockParams, Hkv);
  MOE_VAL(ablk, AttnBlockParams, hd); MOE_VAL(ablk, AttnBlockParams, pos); MOE_VAL(ablk, AttnBlockParams, S_cap);
  MOE_VAL(ablk, AttnBlockParams, valid_stride);

  py::class_<RMSNormParams> rms(m, "RMSNormParams", py::module_local());
  rms.def(py::init<>());
  MOE_PTR(rms, RMSNormParams, x); MOE_PTR(rms, RMSNormParams, w); MOE_PTR(rms, RMSNormParams, out);
  MOE_VAL(rms, RMSNormParams, eps); MOE_VAL(rms, RMSNormParams, dtype); MOE_VAL(rms, RMSNormParams, T);
  MOE_VAL(rms, RMSNormParams, D);

  py::class_<DecodeLayer> dl(m, "DecodeLayer", py::module_local());
  dl.def(py::init<>());
  MOE_PTR(dl, DecodeLayer, input_norm); MOE_PTR(dl, DecodeLayer, post_norm); MOE_PTR(dl, DecodeLayer, qkv);
  MOE_PTR(dl, DecodeLayer, o); MOE_PTR(dl, DecodeLayer, router); MOE_PTR(dl, DecodeLayer, w13);
  MOE_PTR(dl, DecodeLayer, w2); MOE_PTR(dl, DecodeLayer, shared_w13); MOE_PTR(dl, DecodeLayer, shared_w2);
  MOE_VAL(dl, DecodeLayer, F); MOE_VAL(dl, DecodeLayer, S);
  py::bind_vector<std::vector<DecodeLayer>>(m, "DecodeLayers", py::module_local());

  // `layers` is not a field: the launchers take a DecodeLayers and point the struct at it.
  py::class_<DecodeStepParams> ds(m, "DecodeStepParams", py::module_local());
  ds.def(py::init<>());
  MOE_PTR(ds, DecodeStepParams, ids); MOE_PTR(ds, DecodeStepParams, embed);
  MOE_PTR(ds, DecodeStepParams, rope_cos); MOE_PTR(ds, DecodeStepParams, rope_sin);
  MOE_PTR(ds, DecodeStepParams, next_pos);
  MOE_PTR(ds, DecodeStepParams, k_cache); MOE_PTR(ds, DecodeStepParams, v_cache);
  MOE_VAL(ds, DecodeStepParams, cache_bytes);
  MOE_PTR(ds, DecodeStepParams, valid); MOE_PTR(ds, DecodeStepParams, k);
  MOE_PTR(ds, DecodeStepParams, force_expert); MOE_PTR(ds, DecodeStepParams, expert_mask);
  MOE_VAL(ds, DecodeStepParams, force_stride); MOE_VAL(ds, DecodeStepParams, mask_stride);
  MOE_VAL(ds, DecodeStepParams, mask_mode); MOE_VAL(ds, DecodeStepParams, renormalize);
  MOE_PTR(ds, DecodeStepParams, usage_counts); MOE_PTR(ds, DecodeStepParams, final_norm);
  MOE_PTR(ds, DecodeStepParams, lm_head); MOE_PTR(ds, DecodeStepParams, logits);
  MOE_PTR(ds, DecodeStepParams, workspace); MOE_VAL(ds, DecodeStepParams, eps);
  MOE_VAL(ds, DecodeStepParams, scale); MOE_VAL(ds, DecodeStepParams, dtype);
  MOE_VAL(ds, DecodeStepParams, B); MOE_VAL(ds, DecodeStepParams, D); MOE_VAL(ds, DecodeStepParams, H);
  MOE_VAL(ds, DecodeStepParams, Hkv); MOE_VAL(ds, DecodeStepParams, hd); MOE_VAL(ds, DecodeStepParams, E);
  MOE_VAL(ds, DecodeStepParams, k_max); MOE_VAL(ds, DecodeStepParams, V); MOE_VAL(ds, DecodeStepParams, pos);
  MOE_VAL(ds, DecodeStepParams, rope_len);
  MOE_VAL(ds, DecodeStepParams, S_cap); MOE_VAL(ds, DecodeStepParams, valid_stride);

#if !defined(MOE_EMU)
  // ---- quantized weights (csrc/cpu/quant_gemm.cpp) ----
  py::class_<QFormat> qfmt(m, "QFormat", py::module_local());
  qfmt.def(py::init<>());
  MOE_VAL(qfmt, QFormat, bits); MOE_VAL(qfmt, QFormat, group_size); MOE_VAL(qfmt, QFormat, scales_bf16);

  py::class_<QPackParams> qpack(m, "QPackParams", py::module_local());
  qpack.def(py::init<>());
  MOE_PTR(qpack, QPackParams, qweight); MOE_PTR(qpack, QPackParams, scales); MOE_PTR(qpack, QPackParams, qzeros);
  MOE_PTR(qpack, QPackParams, dst); MOE_VAL(qpack, QPackParams, fmt); MOE_VAL(qpack, QPackParams, E);
  MOE_VAL(qpack, QPackParams, N); MOE_VAL(qpack, QPackParams, K); MOE_VAL(qpack, QPackParams, sym);
  MOE_VAL(qpack, QPackParams, gate_up);

  py::class_<QRtnParams> qrtn(m, "QRtnParams", py::module_local());
  qrtn.def(py::init<>());
  MOE_PTR(qrtn, QRtnParams, w); MOE_PTR(qrtn, QRtnParams, qweight); MOE_PTR(qrtn, QRtnParams, scales);
  MOE_PTR(qrtn, QRtnParams, qzeros); MOE_VAL(qrtn, QRtnParams, dtype); MOE_VAL(qrtn, QRtnParams, E);
  MOE_VAL(qrtn, QRtnParams, N); MOE_VAL(qrtn, QRtnParams, K); MOE_VAL(qrtn, QRtnParams, bits);
  MOE_VAL(qrtn, QRtnParams, group_size); MOE_VAL(qrtn, QRtnParams, zero_offset); MOE_VAL(qrtn, QRtnParams, sym);

  py::class_<QDequantParams> qdeq(m, "QDequantParams", py::module_local());
  qdeq.def(py::init<>());
  MOE_PTR(qdeq, QDequantParams, src); MOE_PTR(qdeq, QDequantParams, dst); MOE_VAL(qdeq, QDequantParams, fmt);
  MOE_VAL(qdeq, QDequantParams, dtype); MOE_VAL(qdeq, QDequantParams, E); MOE_VAL(qdeq, QDequantParams, N);
  MOE_VAL(qdeq, QDequantParams, K); MOE_VAL(qdeq, QDequantParams, gate_up);

  py::class_<QLinearParams> qlin(m, "QLinearParams", py::module_local());
  qlin.def(py::init<>());
  MOE_PTR(qlin, QLinearParams, x); MOE_PTR(qlin, QLinearParams, w); MOE_PTR(qlin, QLinearParams, y);
  MOE_PTR(qlin, QLinearParams, workspace); MOE_VAL(qlin, QLinearParams, fmt); MOE_VAL(qlin, QLinearParams, dtype);
  MOE_VAL(qlin, QLinearParams, T); MOE_VAL(qlin, QLinearParams, N); MOE_VAL(qlin, QLinearParams, K);

  py::class_<QExpertFFNParams> qffn(m, "QExpertFFNParams", py::module_local());
  qffn.def(py::init<>());
  MOE_PTR(qffn, QExpertFFNParams, x); MOE_PTR(qffn, QExpertFFNParams, w13); MOE_PTR(qffn, QExpertFFNParams, w2);
  MOE_PTR(qffn, QExpertFFNParams, topk_ids); MOE_PTR(qffn, QExpertFFNParams, expert_out);
  MOE_PTR(qffn, QExpertFFNParams, workspace); MOE_VAL(qffn, QExpertFFNParams, fmt13);
  MOE_VAL(qffn, QExpertFFNParams, fmt2); MOE_VAL(qffn, QExpertFFNParams, dtype);
  MOE_VAL(qffn, QExpertFFNParams, T); MOE_VAL(qffn, QExpertFFNParams, k_max); MOE_VAL(qffn, QExpertFFNParams, D);
  MOE_VAL(qffn, QExpertFFNParams, F); MOE_VAL(qffn, QExpertFFNParams, E);

  // the one-call paths' per-weight formats (bits 0: bf16/fp32 panels; csrc/cpu/either_panels.h)
  MOE_VAL(dl, DecodeLayer, qkv_fmt); MOE_VAL(dl, DecodeLayer, o_fmt); MOE_VAL(dl, DecodeLayer, fmt13);
  MOE_VAL(dl, DecodeLayer, fmt2); MOE_VAL(dl, DecodeLayer, shared_fmt13); MOE_VAL(dl, DecodeLayer, shared_fmt2);
  MOE_VAL(layer, MoELayerParams, fmt13); MOE_VAL(layer, MoELayerParams, fmt2);
  MOE_VAL(layer, MoELayerParams, shared_fmt13); MOE_VAL(layer, MoELayerParams, shared_fmt2);
  MOE_VAL(ablk, AttnBlockParams, qkv_fmt); MOE_VAL(ablk, AttnBlockParams, o_fmt);
  MOE_VAL(ds, DecodeStepParams, lm_head_fmt);
  MOE_PTR(ablk, AttnBlockParams, workspace);

  m.def("qpack_size_bytes", [](int64_t E, int64_t N, int64_t K, const QFormat& f, bool gate_up) {
    sizes("qpack_size_bytes", {{"E", E, 0}, {"N", N, 0}, {"K", K, 0}});
    qformat("qpack_size_bytes", f);
    return qpack_size_bytes(E, N, K, f, gate_up);
  });
  m.def("linear_q_workspace_bytes", [](int64_t T, int64_t K, const QFormat& f) {
    sizes("linear_q_workspace_bytes", {{"T", T, 0}, {"K", K, 0}});
    qformat("linear_q_workspace_bytes", f);
    return linear_q_workspace_bytes(T, K, f);
  });
  m.def("expert_ffn_q_workspace_bytes", [](int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                           const QFormat& f13, const QFormat& f2) {
    sizes("expert_ffn_q_workspace_bytes", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}, {"D", D, 0}, {"F", F, 0}});
    qformat("expert_ffn_q_workspace_bytes (f13)", f13);
    qformat("expert_ffn_q_workspace_bytes (f2)", f2);
    return expert_ffn_q_workspace_bytes(T, k_max, E, D, F, f13, f2);
  });
  m.def("quantize_rtn_cpu", &quantize_rtn_cpu);
  m.def("pack_quantized_cpu", &pack_quantized_cpu);
  m.def("dequantize_packed_cpu", &dequantize_packed_cpu);
  m.def("linear_q_cpu", &linear_q_cpu);
  m.def("expert_ffn_q_cpu", &expert_ffn_q_cpu);
#endif

#if defined(MOE_WITH_CUDA)
  m.def("route_cuda", MOE_STREAM(route_cuda, RouteParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("align_cuda", MOE_STREAM(align_cuda, AlignParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("combine_cuda", MOE_STREAM(combine_cuda, CombineParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("expert_gemm_cuda", MOE_STREAM(expert_gemm_cuda, ExpertGemmParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("moe_decode_cuda", MOE_STREAM(moe_decode_cuda, MoeDecodeParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("shared_expert_cuda", MOE_STREAM(shared_expert_cuda, SharedExpertParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("expert_gemm_block_m", [](int T, int k_max, int E) {
    sizes("expert_gemm_block_m", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}});
    return expert_gemm_block_m(T, k_max, E);
  });
#endif
#if defined(MOE_WITH_CUDA)
  // ---- quantized experts on the CUDA kernels (csrc/cuda/moe_decode_q.cu) ----
#if defined(MOE_EMU)  // _C binds QFormat with the cpu quantized kernels above
  py::class_<QFormat> qfmt_cuda(m, "QFormat", py::module_local());
  qfmt_cuda.def(py::init<>());
  MOE_VAL(qfmt_cuda, QFormat, bits); MOE_VAL(qfmt_cuda, QFormat, group_size);
  MOE_VAL(qfmt_cuda, QFormat, scales_bf16);
#endif
  py::class_<QRepackParams> qrep(m, "QRepackParams", py::module_local());
  qrep.def(py::init<>());
  MOE_PTR(qrep, QRepackParams, qweight); MOE_PTR(qrep, QRepackParams, scales); MOE_PTR(qrep, QRepackParams, qzeros);
  MOE_PTR(qrep, QRepackParams, dst); MOE_VAL(qrep, QRepackParams, fmt); MOE_VAL(qrep, QRepackParams, E);
  MOE_VAL(qrep, QRepackParams, N); MOE_VAL(qrep, QRepackParams, K); MOE_VAL(qrep, QRepackParams, sym);

  py::class_<MoeDecodeQParams> decq(m, "MoeDecodeQParams", py::module_local());
  decq.def(py::init<>());
  MOE_PTR(decq, MoeDecodeQParams, x); MOE_PTR(decq, MoeDecodeQParams, topk_ids); MOE_PTR(decq, MoeDecodeQParams, w13);
  MOE_PTR(decq, MoeDecodeQParams, w2); MOE_PTR(decq, MoeDecodeQParams, act);
  MOE_PTR(decq, MoeDecodeQParams, expert_out); MOE_VAL(decq, MoeDecodeQParams, fmt);
  MOE_VAL(decq, MoeDecodeQParams, T); MOE_VAL(decq, MoeDecodeQParams, k_max); MOE_VAL(decq, MoeDecodeQParams, E);
  MOE_VAL(decq, MoeDecodeQParams, D); MOE_VAL(decq, MoeDecodeQParams, F);

  py::class_<ExpertGemmQParams> gemmq(m, "ExpertGemmQParams", py::module_local());
  gemmq.def(py::init<>());
  MOE_PTR(gemmq, ExpertGemmQParams, a); MOE_VAL(gemmq, ExpertGemmQParams, a_stride); MOE_PTR(gemmq, ExpertGemmQParams, w);
  MOE_PTR(gemmq, ExpertGemmQParams, c); MOE_PTR(gemmq, ExpertGemmQParams, sorted_slots);
  MOE_PTR(gemmq, ExpertGemmQParams, tile_experts); MOE_PTR(gemmq, ExpertGemmQParams, num_padded);
  MOE_VAL(gemmq, ExpertGemmQParams, T); MOE_VAL(gemmq, ExpertGemmQParams, k_max); MOE_VAL(gemmq, ExpertGemmQParams, E);
  MOE_VAL(gemmq, ExpertGemmQParams, D); MOE_VAL(gemmq, ExpertGemmQParams, F);
  MOE_VAL(gemmq, ExpertGemmQParams, capacity); MOE_VAL(gemmq, ExpertGemmQParams, block_m);
  MOE_VAL(gemmq, ExpertGemmQParams, up); MOE_PTR(gemmq, ExpertGemmQParams, topk_ids);
  MOE_VAL(gemmq, ExpertGemmQParams, fmt);

  m.def("qcuda_row_bytes", &qcuda_row_bytes);
  m.def("expert_gemm_q_cuda", MOE_STREAM(expert_gemm_q_cuda, ExpertGemmQParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("qrepack_cuda", MOE_STREAM(qrepack_cuda, QRepackParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("moe_decode_q_cuda", MOE_STREAM(moe_decode_q_cuda, MoeDecodeQParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
#endif
#if !defined(MOE_EMU)
  m.def("route_cpu", &route_cpu);
  m.def("align_cpu", &align_cpu);
  m.def("combine_cpu", &combine_cpu);
  m.def("pack_weights_cpu", &pack_weights_cpu);
  m.def("expert_ffn_cpu", &expert_ffn_cpu);
  m.def("linear_cpu", &linear_cpu);
  m.def("moe_layer_cpu", &moe_layer_cpu);
  m.def("attention_decode_cpu", &attention_decode_cpu);
  m.def("attention_block_decode_cpu", &attention_block_decode_cpu);
  m.def("rms_norm_cpu", &rms_norm_cpu);
  m.def("decode_step_cpu", [](DecodeStepParams p, const std::vector<DecodeLayer>& layers) {
    p.layers = layers.data(), p.L = int32_t(layers.size());
    decode_step_cpu(p);
  });
  m.def("decode_step_workspace_bytes", [](DecodeStepParams p, const std::vector<DecodeLayer>& layers) {
    p.layers = layers.data(), p.L = int32_t(layers.size());
    return decode_step_workspace_bytes(p);
  });
  m.def("pack_size_bytes", [](DType dtype, int64_t E, int64_t N, int64_t K, bool gate_up) {
    sizes("pack_size_bytes", {{"E", E, 0}, {"N", N, 0}, {"K", K, 0}});
    return pack_size_bytes(dtype, E, N, K, gate_up);
  });
  m.def("expert_ffn_workspace_bytes", [](DType dtype, int64_t T, int64_t k_max, int64_t E, int64_t F) {
    sizes("expert_ffn_workspace_bytes", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}, {"F", F, 0}});
    return expert_ffn_workspace_bytes(dtype, T, k_max, E, F);
  });
  // The calling thread's OpenMP team size, which every csrc/cpu region takes (cpu::max_threads):
  // n > 0 sets it for this thread only (torch.set_num_threads would change the process-wide
  // setting); returns the value before. decode_threads.py lowers it for a decode step when the
  // machine is busy.
  m.def("kernel_threads", [](int n) {
    sizes("kernel_threads", {{"n", n, 0}});
#if defined(_OPENMP)
    const int before = omp_get_max_threads();
    if (n > 0) omp_set_num_threads(n);
    return before;
#else
    return 1;
#endif
  }, py::arg("n") = 0);
  m.attr("cpu_isa") = MOE_CPU_ISA;  // which of csrc/cpu/simd.h's three builds this is
#endif

#if defined(MOE_WITH_CUDA) && !defined(MOE_EMU)
  m.attr("has_cuda_kernels") = true;
  m.def("cuda_device_count", [] {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) { (void)cudaGetLastError(); return 0; }
    return n;
  });
#else
  m.attr("has_cuda_kernels") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}
