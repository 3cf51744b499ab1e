// decode_step (CPU): a whole decode step -- every layer, the final norm and the lm_head -- in
// one call (ops.h has the sequence). It only sequences the kernels of attention_decode.cpp,
// moe_layer.cpp, expert_ffn.cpp (quant_gemm.cpp for quantized weights: either_panels.h) on one
// workspace, with the residual adds rounded as the model's torch code rounds them, so its logits
// are bit-identical to Model.forward's cpu path op by op (tests/test_model_backends.py and, for
// quantized models, tests/test_quant_model.py pin that).
// Why: with a C++ call per layer the Python around a small model's decode-step kernels costs
// a large fraction of the kernels' own time; with this one call a tenth of that
// (bench/throughput.py --profile-overhead; figures in bench/README.md).
// Traffic: the weights of the step once (attention, chosen experts, shared, dense, lm_head: each
// as bf16/fp32 panels or quantized, per its QFormat) +
// the KV cache columns <= pos; the workspace is a few hundred KB and stays in cache.
#include <algorithm>

#include "common.h"
#include "either_panels.h"

namespace moe {
namespace {

using cpu::align64;
using cpu::esize;

// Byte offsets of the step's buffers in the workspace (one place for the sizes and the carve).
struct Layout {
  int64_t x, cos, sin, h, a, m, qkv, attn, scores, router_logits, topk_ids, topk_weights, expert_out,
      shared_out, shared_ids, head, ffn, total;
};

Layout layout(const DecodeStepParams& p) {
  const int64_t B = p.B, D = p.D, el = esize(p.dtype);
  const int64_t nq = int64_t(p.H) * p.hd, nqkv = nq + 2 * int64_t(p.Hkv) * p.hd;
  int64_t ffn = 0;
  for (int32_t l = 0; l < p.L; ++l) {
    const DecodeLayer& ly = p.layers[l];
    // one scratch for the layer's kernels, which run one after another
    if (ly.router)
      ffn = std::max(ffn, cpu::either_expert_ffn_workspace_bytes(p.dtype, B, p.k_max, p.E, D, ly.F, ly.fmt13, ly.fmt2));
    else
      ffn = std::max(ffn, cpu::either_expert_ffn_workspace_bytes(p.dtype, B, 1, 1, D, ly.F, ly.fmt13, ly.fmt2));
    if (ly.shared_w13)
      ffn = std::max(ffn, cpu::either_expert_ffn_workspace_bytes(p.dtype, B, 1, 1, D, ly.S, ly.shared_fmt13,
                                                                  ly.shared_fmt2));
    ffn = std::max(ffn, cpu::either_linear_workspace_bytes(B, D, ly.qkv_fmt));
    ffn = std::max(ffn, cpu::either_linear_workspace_bytes(B, nq, ly.o_fmt));
  }
  ffn = std::max(ffn, cpu::either_linear_workspace_bytes(B, D, p.lm_head_fmt));
  Layout o{};
  int64_t at = 0;
  auto take = [&](int64_t bytes) { const int64_t here = at; at += align64(std::max<int64_t>(bytes, 1)); return here; };
  o.x = take(B * D * el);
  o.cos = take(B * int64_t(p.hd) * el);
  o.sin = take(B * int64_t(p.hd) * el);
  o.h = take(B * D * el);
  o.a = take(B * D * el);
  o.m = take(B * D * el);
  o.qkv = take(B * nqkv * el);
  o.attn = take(B * nq * el);
  o.scores = take(B * int64_t(p.H) * p.Tkv_cap * 4);
  o.router_logits = take(B * int64_t(p.E) * el);
  o.topk_ids = take(B * int64_t(p.k_max) * 4);
  o.topk_weights = take(B * int64_t(p.k_max) * 4);
  o.expert_out = take(B * int64_t(p.k_max) * D * el);
  o.shared_out = take(B * D * el);
  o.shared_ids = take(B * 4);
  o.head = take(B * int64_t(p.V) * el);
  o.ffn = take(ffn);
  o.total = at;
  return o;
}

// x = round_dt(x + y), elementwise (torch's bf16 add: fp32 sum, one rounding).
void add_inplace(void* x, const void* y, DType dt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) cpu::store(x, dt, i, cpu::load(x, dt, i) + cpu::load(y, dt, i));
}

void check(const DecodeStepParams& p) {
  auto bad = [](const std::string& what) { cpu::fail("decode_step_cpu", what); };
  if (!p.layers || p.L <= 0) bad("needs at least one layer, got L=" + std::to_string(p.L));
  if (p.B <= 0 || p.D <= 0 || p.H <= 0 || p.Hkv <= 0 || p.H % p.Hkv || p.hd <= 0 || p.V <= 0)
    bad("bad sizes B=" + std::to_string(p.B) + " D=" + std::to_string(p.D) + " H=" + std::to_string(p.H) +
        " Hkv=" + std::to_string(p.Hkv) + " hd=" + std::to_string(p.hd) + " V=" + std::to_string(p.V));
  if (p.hd % 2 || p.rope_len <= 0)
    bad("hd=" + std::to_string(p.hd) + " must be even, rope_len=" + std::to_string(p.rope_len) + " positive");
  if (p.pos < 0 || p.pos >= p.Tkv_cap || p.valid_stride <= p.pos)
    bad("cache column pos=" + std::to_string(p.pos) + " is outside Tkv_cap=" + std::to_string(p.Tkv_cap) +
        " / valid_stride=" + std::to_string(p.valid_stride));
  cpu::need_dtype("decode_step_cpu", p.dtype);
  if (p.hd > 1024) bad("hd=" + std::to_string(p.hd) + " > 1024 (the attention's stack buffers)");
  if (p.E < 0 || p.k_max < 0 || p.k_max > p.E || p.Tkv_cap <= 0)
    bad("E=" + std::to_string(p.E) + " k_max=" + std::to_string(p.k_max) + " Tkv_cap=" + std::to_string(p.Tkv_cap) +
        " (need 0 <= k_max <= E, Tkv_cap > 0)");
  // The KV cache is the caller's tensor: a cache made for another model (fewer layers, other
  // dtype, head_dim or kv heads) must not be indexed with this model's sizes.
  const int64_t want = int64_t(p.L) * p.B * p.Hkv * int64_t(p.Tkv_cap) * p.hd * cpu::esize(p.dtype);
  if (p.cache_bytes != want)
    bad("k_cache/v_cache hold " + std::to_string(p.cache_bytes) + " bytes each, but L=" + std::to_string(p.L) +
        " B=" + std::to_string(p.B) + " Hkv=" + std::to_string(p.Hkv) + " Tkv_cap=" + std::to_string(p.Tkv_cap) +
        " hd=" + std::to_string(p.hd) + " need " + std::to_string(want));
  cpu::check_either("decode_step_cpu lm_head", p.lm_head_fmt, p.D);
  for (int32_t l = 0; l < p.L; ++l) {
    const DecodeLayer& ly = p.layers[l];
    if (!ly.input_norm || !ly.post_norm || !ly.qkv || !ly.o || !ly.w13 || !ly.w2 || ly.F <= 0)
      bad("layer " + std::to_string(l) + " is missing a weight (or F=" + std::to_string(ly.F) + ")");
    if (ly.router && (p.E <= 0 || p.k_max <= 0))
      bad("layer " + std::to_string(l) + " is an MoE layer but E=" + std::to_string(p.E) +
          " k_max=" + std::to_string(p.k_max));
    if (ly.router && ((p.mask_stride != 0 && p.mask_stride != p.E) || (p.force_stride != 0 && p.force_stride != 1)))
      bad("mask_stride=" + std::to_string(p.mask_stride) + " force_stride=" + std::to_string(p.force_stride) +
          ": expected mask_stride 0 or E=" + std::to_string(p.E) + " and force_stride 0 or 1");
    if (bool(ly.shared_w13) != (ly.S > 0) || bool(ly.shared_w13) != bool(ly.shared_w2))
      bad("layer " + std::to_string(l) + ": shared weights and S=" + std::to_string(ly.S) + " disagree");
    const std::string at = "decode_step_cpu layer " + std::to_string(l);
    const int64_t nq = int64_t(p.H) * p.hd;
    cpu::check_either((at + " qkv").c_str(), ly.qkv_fmt, p.D);
    cpu::check_either((at + " o").c_str(), ly.o_fmt, nq);
    cpu::check_either((at + " w13").c_str(), ly.fmt13, p.D, &ly.fmt2);
    cpu::check_either((at + " w2").c_str(), ly.fmt2, ly.F);
    if (ly.shared_w13) {
      cpu::check_either((at + " shared w13").c_str(), ly.shared_fmt13, p.D, &ly.shared_fmt2);
      cpu::check_either((at + " shared w2").c_str(), ly.shared_fmt2, ly.S);
    }
  }
}

}  // namespace

int64_t decode_step_workspace_bytes(const DecodeStepParams& p) {
  check(p);
  return layout(p).total;
}

void decode_step_cpu(const DecodeStepParams& p) {
  check(p);
  auto need = [](const void* ptr, const char* name) { cpu::need("decode_step_cpu", ptr, name); };
  need(p.ids, "ids"), need(p.embed, "embed"), need(p.rope_cos, "rope_cos"), need(p.rope_sin, "rope_sin");
  need(p.next_pos, "next_pos"), need(p.k_cache, "k_cache"), need(p.v_cache, "v_cache"), need(p.valid, "valid");
  need(p.final_norm, "final_norm"), need(p.lm_head, "lm_head"), need(p.logits, "logits");
  need(p.workspace, "workspace");
  for (int32_t l = 0; l < p.L; ++l)
    if (p.layers[l].router) {  // k and force_expert are read for MoE layers only
      need(p.k, "k"), need(p.force_expert, "force_expert");
      break;
    }
  for (int32_t b = 0; b < p.B; ++b) {  // nothing is written before every id and position passed
    if (p.ids[b] < 0 || p.ids[b] >= p.V)
      throw std::invalid_argument("token id " + std::to_string(p.ids[b]) + " is outside the vocabulary [0, " +
                                  std::to_string(p.V) + ")");
    if (p.next_pos[b] < 0 || p.next_pos[b] >= p.rope_len)
      cpu::fail("decode_step_cpu", "position " + std::to_string(p.next_pos[b]) + " of sequence " +
                                       std::to_string(b) + " is outside the rope table [0, " +
                                       std::to_string(p.rope_len) + ")");
  }
  const Layout lo = layout(p);
  char* ws = static_cast<char*>(p.workspace);
  const DType dt = p.dtype;
  const int64_t B = p.B, D = p.D, el = esize(dt), hd = p.hd;
  void* x = ws + lo.x;
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(static_cast<char*>(x) + b * D * el, static_cast<const char*>(p.embed) + p.ids[b] * D * el, D * el);
    const int64_t row = p.next_pos[b] * hd * el;
    std::memcpy(ws + lo.cos + b * hd * el, static_cast<const char*>(p.rope_cos) + row, hd * el);
    std::memcpy(ws + lo.sin + b * hd * el, static_cast<const char*>(p.rope_sin) + row, hd * el);
    p.valid[b * int64_t(p.valid_stride) + p.pos] = 1;
    p.next_pos[b] += 1;
  }
  const int64_t cache_layer = B * p.Hkv * int64_t(p.Tkv_cap) * p.hd * el;  // bytes per layer
  void* h = ws + lo.h;
  void* a = ws + lo.a;
  void* m = ws + lo.m;
  int32_t* shared_ids = reinterpret_cast<int32_t*>(ws + lo.shared_ids);
  std::fill(shared_ids, shared_ids + B, 0);  // every token -> expert 0 of a one-expert FFN

  for (int32_t l = 0; l < p.L; ++l) {
    const DecodeLayer& ly = p.layers[l];
    rms_norm_cpu(RMSNormParams{x, ly.input_norm, h, p.eps, dt, p.B, p.D});
    AttnBlockParams ab{};
    ab.x = h, ab.qkv = ly.qkv, ab.o = ly.o, ab.cos = ws + lo.cos, ab.sin = ws + lo.sin;
    ab.k_cache = static_cast<char*>(p.k_cache) + l * cache_layer;
    ab.v_cache = static_cast<char*>(p.v_cache) + l * cache_layer;
    ab.valid = p.valid, ab.qkv_buf = ws + lo.qkv, ab.attn_buf = ws + lo.attn;
    ab.scores = reinterpret_cast<float*>(ws + lo.scores), ab.out = a;
    ab.scale = p.scale, ab.dtype = dt;
    ab.B = p.B, ab.D = p.D, ab.H = p.H, ab.Hkv = p.Hkv, ab.hd = p.hd;
    ab.pos = p.pos, ab.Tkv_cap = p.Tkv_cap, ab.valid_stride = p.valid_stride;
    ab.qkv_fmt = ly.qkv_fmt, ab.o_fmt = ly.o_fmt, ab.workspace = ws + lo.ffn;
    attention_block_decode_cpu(ab);
    add_inplace(x, a, dt, B * D);
    rms_norm_cpu(RMSNormParams{x, ly.post_norm, h, p.eps, dt, p.B, p.D});
    if (ly.router) {
      MoELayerParams mp{};
      mp.x = h, mp.residual = x, mp.out = x;  // residual may alias out
      mp.router = ly.router, mp.w13 = ly.w13, mp.w2 = ly.w2;
      mp.shared_w13 = ly.shared_w13, mp.shared_w2 = ly.shared_w2;
      // per layer: one row (stride 0) or one row per sequence (ops.h, DecodeStepParams)
      mp.k = p.k + l, mp.force_expert = p.force_expert + l * (p.force_stride ? int64_t(p.B) : 1);
      mp.force_stride = p.force_stride, mp.mask_stride = p.mask_stride;
      mp.expert_mask = p.expert_mask ? p.expert_mask + l * (p.mask_stride ? p.B * p.mask_stride : p.E) : nullptr;
      mp.mask_mode = p.mask_mode, mp.renormalize = p.renormalize;
      mp.router_logits = ws + lo.router_logits;
      mp.topk_ids = reinterpret_cast<int32_t*>(ws + lo.topk_ids);
      mp.topk_weights = reinterpret_cast<float*>(ws + lo.topk_weights);
      mp.router_probs = nullptr;
      mp.usage_counts = p.usage_counts ? p.usage_counts + int64_t(l) * p.E : nullptr;
      mp.expert_out = ws + lo.expert_out, mp.shared_out = ws + lo.shared_out;
      mp.shared_ids = shared_ids, mp.routed_out = nullptr, mp.workspace = ws + lo.ffn;
      mp.dtype = dt;
      mp.T = p.B, mp.D = p.D, mp.E = p.E, mp.F = ly.F, mp.S = ly.S, mp.k_max = p.k_max;
      mp.fmt13 = ly.fmt13, mp.fmt2 = ly.fmt2, mp.shared_fmt13 = ly.shared_fmt13, mp.shared_fmt2 = ly.shared_fmt2;
      moe_layer_cpu(mp);
    } else {
      cpu::either_expert_ffn(ExpertFFNParams{h, ly.w13, ly.w2, shared_ids, m, ws + lo.ffn, dt, p.B, 1, p.D, ly.F, 1},
                             ly.fmt13, ly.fmt2);
      add_inplace(x, m, dt, B * D);
    }
  }
  rms_norm_cpu(RMSNormParams{x, p.final_norm, h, p.eps, dt, p.B, p.D});
  void* head = ws + lo.head;
  cpu::either_linear(LinearParams{h, p.lm_head, head, dt, p.B, p.V, p.D}, p.lm_head_fmt, ws + lo.ffn);
  for (int64_t i = 0; i < B * p.V; ++i) p.logits[i] = cpu::load(head, dt, i);
}

}  // namespace moe
