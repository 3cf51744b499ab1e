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
#include <type_traits>
#include <vector>

#include "ops.h"
#if !defined(MOE_EMU)
#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include "cpu/pool.h"
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

// One Python property per field of a Params list (ops.h): pointers as ints (tensor.data_ptr(),
// 0 = null), everything else by value.
template <class S, class F>
static void field(py::class_<S>& cls, const char* name, F S::*member) {
  if constexpr (std::is_pointer_v<F>)
    cls.def_property(
        name, [member](const S& s) { return reinterpret_cast<std::uintptr_t>(s.*member); },
        [member](S& s, std::uintptr_t v) { s.*member = reinterpret_cast<F>(v); });
  else
    cls.def_readwrite(name, member);
}
#define MOE_BIND_FIELD(type, name) field(cls, #name, &Bound::name);
#define MOE_SKIP_FIELD(type, name)
// py::class_ S with a default constructor and the fields of LIST (module_local: _C and _C_emu
// register the same C++ types in one process).
#define MOE_PARAMS(m, S, LIST)                          \
  [&] {                                                 \
    using Bound = S;                                    \
    py::class_<S> cls(m, #S, py::module_local());       \
    cls.def(py::init<>());                              \
    LIST(MOE_BIND_FIELD)                                \
  }()
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

// ---- one function per area; PYBIND11_MODULE at the end calls them -------------------------

static void bind_types(py::module_& m) {
  py::enum_<DType>(m, "DType", py::module_local()).value("f32", DType::f32).value("bf16", DType::bf16);
  py::enum_<MaskMode>(m, "MaskMode", py::module_local())
      .value("reroute", MaskMode::reroute)
      .value("zero", MaskMode::zero);
  MOE_PARAMS(m, QFormat, MOE_QFORMAT);
}

// route, align, combine: a cpu twin in _C and the CUDA kernel in _C (with CUDA) and _C_emu.
static void bind_route_align_combine(py::module_& m) {
  MOE_PARAMS(m, RouteParams, MOE_ROUTE_PARAMS);
  MOE_PARAMS(m, AlignParams, MOE_ALIGN_PARAMS);
  MOE_PARAMS(m, CombineParams, MOE_COMBINE_PARAMS);
  m.def("align_capacity", [](int64_t T, int64_t k_max, int64_t E, int64_t block_m) {
    sizes("align_capacity", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}, {"block_m", block_m, 1}});
    return align_capacity(T, k_max, E, block_m);
  });
  m.def("align_workspace_size", [](int64_t T, int64_t k_max, int64_t E) {
    sizes("align_workspace_size", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}});
    return align_workspace_size(T, k_max, E);
  });
#if !defined(MOE_EMU)
  m.def("route_cpu", &route_cpu);
  m.def("align_cpu", &align_cpu);
  m.def("combine_cpu", &combine_cpu);
#endif
#if defined(MOE_WITH_CUDA)
  m.def("route_cuda", MOE_STREAM(route_cuda, RouteParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("align_cuda", MOE_STREAM(align_cuda, AlignParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("combine_cuda", MOE_STREAM(combine_cuda, CombineParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
#endif
}

// cpu packed weights: packing, the expert FFN and the dense mat-vec on panels.
static void bind_cpu_packed(py::module_& m) {
  MOE_PARAMS(m, PackParams, MOE_PACK_PARAMS);
  MOE_PARAMS(m, ExpertFFNParams, MOE_EXPERT_FFN_PARAMS);
  MOE_PARAMS(m, LinearParams, MOE_LINEAR_PARAMS);
#if !defined(MOE_EMU)
  m.def("pack_weights_cpu", &pack_weights_cpu);
  m.def("expert_ffn_cpu", &expert_ffn_cpu);
  m.def("linear_cpu", &linear_cpu);
  m.def("pack_size_bytes", [](DType dtype, int64_t E, int64_t Dout, int64_t Din, bool gate_up) {
    sizes("pack_size_bytes", {{"E", E, 0}, {"Dout", Dout, 0}, {"Din", Din, 0}});
    return pack_size_bytes(dtype, E, Dout, Din, gate_up);
  });
  m.def("expert_ffn_workspace_bytes", [](DType dtype, int64_t T, int64_t k_max, int64_t E, int64_t F) {
    sizes("expert_ffn_workspace_bytes", {{"T", T, 0}, {"k_max", k_max, 0}, {"E", E, 0}, {"F", F, 0}});
    return expert_ffn_workspace_bytes(dtype, T, k_max, E, F);
  });
#endif
}

// CUDA experts: grouped GEMM, the small-batch decode path and the shared experts.
static void bind_cuda_experts(py::module_& m) {
  MOE_PARAMS(m, ExpertGemmParams, MOE_EXPERT_GEMM_PARAMS);
  MOE_PARAMS(m, MoeDecodeParams, MOE_MOE_DECODE_PARAMS);
  MOE_PARAMS(m, SharedExpertParams, MOE_SHARED_EXPERT_PARAMS);
#if defined(MOE_WITH_CUDA)
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
  // -> (decode, block_m, up_splits, down_splits, partial_floats): how shared_expert_cuda runs T tokens.
  m.def("shared_expert_plan", [](int T, int D, int S, bool x_contiguous) {
    sizes("shared_expert_plan", {{"T", T, 0}, {"D", D, 1}, {"S", S, 1}});
    const SharedExpertPlan p = shared_expert_plan(T, D, S, x_contiguous);
    return py::make_tuple(p.decode, p.block_m, p.up_splits, p.down_splits, p.partial_floats);
  }, py::arg("T"), py::arg("D"), py::arg("S"), py::arg("x_contiguous") = true);
#endif
}

// The cpu backend's one-call paths: the MoE layer, attention, rms_norm and the decode step.
#define MOE_DECODE_STEP_BOUND(X) MOE_DECODE_STEP_PARAMS(X, MOE_SKIP_FIELD)
static void bind_cpu_layers(py::module_& m) {
  MOE_PARAMS(m, MoELayerParams, MOE_LAYER_PARAMS);
  MOE_PARAMS(m, AttnDecodeParams, MOE_ATTN_DECODE_PARAMS);
  MOE_PARAMS(m, AttnBlockParams, MOE_ATTN_BLOCK_PARAMS);
  MOE_PARAMS(m, RMSNormParams, MOE_RMS_NORM_PARAMS);
  MOE_PARAMS(m, DecodeLayer, MOE_DECODE_LAYER);
  py::bind_vector<std::vector<DecodeLayer>>(m, "DecodeLayers", py::module_local());
  // `layers` and `L` are not properties: the launchers take a DecodeLayers and set both from it.
  MOE_PARAMS(m, DecodeStepParams, MOE_DECODE_STEP_BOUND);
#if !defined(MOE_EMU)
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
#endif
}

// cpu quantized weights (csrc/cpu/quant_gemm.cpp, quantize_rtn.cpp): _C only.
[[maybe_unused]] static void bind_quant_cpu(py::module_& m) {
  MOE_PARAMS(m, QPackParams, MOE_QPACK_PARAMS);
  MOE_PARAMS(m, QRtnParams, MOE_QRTN_PARAMS);
  MOE_PARAMS(m, QDequantParams, MOE_QDEQUANT_PARAMS);
  MOE_PARAMS(m, QLinearParams, MOE_QLINEAR_PARAMS);
  MOE_PARAMS(m, QExpertFFNParams, MOE_QEXPERT_FFN_PARAMS);
  m.def("qpack_size_bytes", [](int64_t E, int64_t Dout, int64_t Din, const QFormat& f, bool gate_up) {
    sizes("qpack_size_bytes", {{"E", E, 0}, {"Dout", Dout, 0}, {"Din", Din, 0}});
    qformat("qpack_size_bytes", f);
    return qpack_size_bytes(E, Dout, Din, f, gate_up);
  });
  m.def("linear_q_workspace_bytes", [](int64_t T, int64_t Din, const QFormat& f) {
    sizes("linear_q_workspace_bytes", {{"T", T, 0}, {"Din", Din, 0}});
    qformat("linear_q_workspace_bytes", f);
    return linear_q_workspace_bytes(T, Din, f);
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
}

// quantized experts on the CUDA kernels (csrc/cuda/moe_decode_q.cu, expert_gemm_q.cu).
[[maybe_unused]] static void bind_quant_cuda(py::module_& m) {
  MOE_PARAMS(m, QRepackParams, MOE_QREPACK_PARAMS);
  MOE_PARAMS(m, MoeDecodeQParams, MOE_MOE_DECODE_Q_PARAMS);
  MOE_PARAMS(m, ExpertGemmQParams, MOE_EXPERT_GEMM_Q_PARAMS);
  m.def("qcuda_row_bytes", &qcuda_row_bytes);
#if defined(MOE_WITH_CUDA)
  m.def("expert_gemm_q_cuda", MOE_STREAM(expert_gemm_q_cuda, ExpertGemmQParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("qrepack_cuda", MOE_STREAM(qrepack_cuda, QRepackParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
  m.def("moe_decode_q_cuda", MOE_STREAM(moe_decode_q_cuda, MoeDecodeQParams), py::arg("p"), py::arg("stream") = 0,
        py::arg("device") = -1);
#endif
}

// Which kernels this module holds and the cpu kernels' thread team.
static void bind_runtime(py::module_& m) {
#if !defined(MOE_EMU)
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
  // A test hook of csrc/cpu/pool.h (tests/test_pool.py): one parallel_for of n chunks on the
  // calling thread's team; chunk slow_chunk sleeps slow_ms first, chunk throw_chunk throws, and
  // with nested each chunk runs a parallel_for of 3 chunks inside. Returns how many times each
  // chunk ran (nested: the inner chunks' runs summed) and the number of distinct threads that ran
  // chunks. Releases the GIL, so Python threads can call it at once.
  m.def("pool_check", [](int64_t n, int64_t slow_chunk, int slow_ms, int64_t throw_chunk, bool nested) {
    sizes("pool_check", {{"n", n, 0}, {"slow_ms", slow_ms, 0}});
    std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
    std::mutex mu;
    std::set<std::thread::id> ids;
    {
      py::gil_scoped_release release;
      cpu::parallel_for(n, [&](int64_t i) {
        {
          std::lock_guard<std::mutex> lock(mu);
          ids.insert(std::this_thread::get_id());
        }
        if (i == slow_chunk) std::this_thread::sleep_for(std::chrono::milliseconds(slow_ms));
        if (i == throw_chunk) throw std::runtime_error("pool_check: chunk " + std::to_string(i) + " threw");
        if (nested) cpu::parallel_for(3, [&](int64_t) { runs[size_t(i)].fetch_add(1); });
        else runs[size_t(i)].fetch_add(1);
      });
    }
    py::list out;
    for (auto& r : runs) out.append(r.load());
    return py::make_tuple(out, int(ids.size()));
  }, py::arg("n"), py::arg("slow_chunk") = -1, py::arg("slow_ms") = 0, py::arg("throw_chunk") = -1,
     py::arg("nested") = false);
  m.def("pool_threads", &cpu::pool_threads, "threads the cpu kernels' pool holds (0 before its first job)");
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

PYBIND11_MODULE(MOE_MODULE_NAME, m) {
  bind_types(m);
  bind_route_align_combine(m);
  bind_cpu_packed(m);
  bind_cuda_experts(m);
  bind_cpu_layers(m);
#if !defined(MOE_EMU)
  bind_quant_cpu(m);
#endif
#if defined(MOE_WITH_CUDA)
  bind_quant_cuda(m);
#endif
  bind_runtime(m);
}
