// moe_layer (CPU): one MoE layer's FFN in a single call, so a decode step's Python work per
// layer is one call instead of five checked dispatches (bench/throughput.py --profile-overhead
// measures the difference). It only sequences the kernels of route.cpp, expert_ffn.cpp and
// combine.cpp on caller buffers, so its output is bit-identical to the unfused cpu path
// (tests/test_model_backends.py pins that) and every tap buffer is filled as there.
// Traffic: router E*D + the chosen experts' 3*D*F each + the shared 3*D*S, once per call.
#include "common.h"
#include "either_panels.h"

namespace moe {

void moe_layer_cpu(const MoELayerParams& p) {
  const char* op = "moe_layer_cpu";
  cpu::need_dtype(op, p.dtype);
  cpu::need_sizes(op, {{"T", p.T, 0}, {"D", p.D, 1}, {"E", p.E, 1}, {"F", p.F, 1}, {"S", p.S, 0}, {"k_max", p.k_max, 0}});
  if (p.T == 0) return;
  // the sub-launchers check their own sizes; these pointers are the ones only this call reads
  cpu::need(op, p.x, "x"), cpu::need(op, p.residual, "residual"), cpu::need(op, p.out, "out");
  cpu::need(op, p.router, "router"), cpu::need(op, p.router_logits, "router_logits");
  cpu::need(op, p.k, "k"), cpu::need(op, p.workspace, "workspace");
  if (p.shared_w13 || p.shared_w2) {
    cpu::need(op, p.shared_w13, "shared_w13"), cpu::need(op, p.shared_w2, "shared_w2");
    cpu::need(op, p.shared_out, "shared_out"), cpu::need(op, p.shared_ids, "shared_ids");
    if (p.S <= 0) cpu::fail(op, "shared weights given with S=" + std::to_string(p.S));
  }
  // formats before anything is written (route bumps usage_counts)
  cpu::check_either("moe_layer_cpu (experts w13)", p.fmt13, p.D, &p.fmt2);
  cpu::check_either("moe_layer_cpu (experts w2)", p.fmt2, p.F);
  if (p.shared_w13) {
    cpu::check_either("moe_layer_cpu (shared w13)", p.shared_fmt13, p.D, &p.shared_fmt2);
    cpu::check_either("moe_layer_cpu (shared w2)", p.shared_fmt2, p.S);
  }
  LinearParams lin{p.x, p.router, p.router_logits, p.dtype, p.T, p.E, p.D};
  linear_cpu(lin);

  RouteParams r{};
  r.router_logits = p.router_logits;
  r.logits_dtype = p.dtype;
  r.logits_stride = p.E;
  r.T = p.T, r.E = p.E, r.k_max = p.k_max;
  r.k = p.k, r.expert_mask = p.expert_mask, r.mask_stride = p.mask_stride, r.mask_mode = p.mask_mode;
  r.force_expert = p.force_expert, r.force_stride = p.force_stride, r.renormalize = p.renormalize;
  r.topk_ids = p.topk_ids, r.topk_weights = p.topk_weights;
  r.router_probs = p.router_probs, r.usage_counts = p.usage_counts;
  route_cpu(r);

  ExpertFFNParams f{p.x, p.w13, p.w2, p.topk_ids, p.expert_out, p.workspace, p.dtype,
                    p.T, p.k_max, p.D, p.F, p.E};
  cpu::either_expert_ffn(f, p.fmt13, p.fmt2);  // k = 0: every slot is a sentinel, so this only zeroes expert_out
  if (p.shared_w13) {
    ExpertFFNParams s{p.x, p.shared_w13, p.shared_w2, p.shared_ids, p.shared_out, p.workspace,
                      p.dtype, p.T, 1, p.D, p.S, 1};
    cpu::either_expert_ffn(s, p.shared_fmt13, p.shared_fmt2);
  }
  CombineParams c{p.expert_out, p.topk_weights, p.topk_ids, p.shared_w13 ? p.shared_out : nullptr,
                  p.residual, p.out, p.routed_out, p.dtype, p.T, p.k_max, p.D};
  combine_cpu(c);
}

}  // namespace moe
