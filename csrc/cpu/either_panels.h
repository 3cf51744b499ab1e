// The one-call paths (moe_layer.cpp, attention_decode.cpp's attention block, decode_step.cpp)
// take each weight as either kind of panel, chosen per weight by a QFormat: bits == 0 means
// bf16/fp32 panels (expert_ffn.cpp: linear_cpu, expert_ffn_cpu), bits 4 or 8 quantized panels
// (quant_gemm.cpp: linear_q_cpu, expert_ffn_q_cpu). They call the same kernels as the op-by-op
// path, so a quantized model gets the same bits either way. Defined in quant_gemm.cpp.
#pragma once
#include <cstdint>

#include "../ops.h"

namespace moe::cpu {

inline bool quantized(const QFormat& f) { return f.bits != 0; }
// Throws (naming op) unless f is bits 0, or a valid quantized format for reduction length Din;
// with `pair` (w13's partner w2), unless both are the same kind.
void check_either(const char* op, const QFormat& f, int64_t Din, const QFormat* pair = nullptr);

// y = x W^T; workspace: either_linear_workspace_bytes (0 for bf16/fp32 panels; may be null then).
int64_t either_linear_workspace_bytes(int64_t T, int64_t Din, const QFormat& f);
void either_linear(const LinearParams& p, const QFormat& f, void* workspace);

// expert_ffn_cpu's contract; w13 and w2 must be the same kind (both bits 0 or both quantized).
int64_t either_expert_ffn_workspace_bytes(DType dt, int64_t T, int64_t k_max, int64_t E, int64_t D, int64_t F,
                                          const QFormat& f13, const QFormat& f2);
void either_expert_ffn(const ExpertFFNParams& p, const QFormat& f13, const QFormat& f2);

}  // namespace moe::cpu
