// onnxruntime custom-op library: the sasa_mmdet::LocalAttention node.
//
// The node is what the exporter records for the registered operator
// torch.ops.sasa_mmdet.local_attention (sasa_mmdet/deployment/onnx_symbolic.py):
//
//   inputs:  query (B, N, D, H, W), key (B, N, D, H, W) -- an empty tensor when
//            logits == "qr" --, value (B, N, Dv, H, W), and with q.r logits
//            rel_row (kh, N, Dr), rel_col (kw, N, Dc), Dr + Dc = D; float32
//   output:  (B, N, Dv, H, W), float32
//   attributes: window (ints: kh, kw), dilation (ints: dh, dw), heads (int: N),
//            logits (string: "qk+qr", "qk" or "qr")
//
//   or packed: query is the layer's whole projection (B, 3, N, D, H, W), q, k
//            and v in that order (Dv = D), key and value empty tensors; the
//            kernel reads q, k and v in place (what
//            sasa_mmdet.deployment.pack_attention_inputs makes of an export)
//
//   and the layers after it, folded in by
//   sasa_mmdet.deployment.fuse_attention_epilogues, applied in this order:
//            pool (ints: ph, pw; default 1, 1): a ph x pw average pool of the
//            same stride, ceil mode (the output is (B, N, Dv, ceil(H / ph),
//            ceil(W / pw))); inputs scale and shift (N * Dv) (5 and 6;
//            inputs 3 and 4 empty names without q.r logits): out = scale *
//            out + shift per channel (an inference BatchNorm); activation
//            (string: "none" or "relu")
//
// It runs the forward kernel of the CPU backend, local_attention_core.h (the
// same source the PyTorch extension compiles; no second copy of the math), on
// onnxruntime's intra-op thread pool, compiled for SSE2/the build's target,
// AVX2 and AVX-512 (local_attention_forward_*.cpp) and run with the best the
// CPU has ($SASA_MMDET_ONNXRUNTIME_ISA = baseline, avx2 or avx512 chooses one
// when a session creates the node). Only the C API's function table is used,
// so the library loads into any onnxruntime whose API version is at least the
// headers' (ORT_API_VERSION).
//
// Load it with SessionOptions.register_custom_ops_library(
// sasa_mmdet.onnxruntime_ops_path()).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "local_attention_forward.h"

namespace {

// The kernel context of the Compute call running on this thread: its thread
// pool runs parallel_for, unless the node is too small to share.
thread_local const Ort::KernelContext* current_context = nullptr;
thread_local bool run_on_one_thread = false;

// Multiply-adds below which a node runs on the calling thread alone. The
// pool's threads sleep between nodes (onnx_latency.py turns spinning off, as
// a server sharing its cores would); waking one costs more than the work of a
// smaller node. Measured on the demo model (2 threads, the other core busy):
// nodes of 0.16-0.64 M multiply-adds ran 25-30% faster on one thread, the
// 640x640 model 2-5% faster overall.
constexpr double kMinParallelWork = 1 << 20;

}  // namespace

namespace sasa_onnxruntime {

int64_t max_threads() {
  // onnxruntime does not tell a kernel its thread count; bands beyond it are
  // merely smaller pieces of work. Asked once: glibc reads it from /sys on
  // every call (7 us, a tenth of a small node's time).
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return cores;
}

void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (current_context == nullptr || n <= 1 || run_on_one_thread) {
    fn(0, n);
    return;
  }
  current_context->ParallelFor(
      [](void* data, size_t i) {
        (*static_cast<const std::function<void(int64_t, int64_t)>*>(data))(
            int64_t(i), int64_t(i) + 1);
      },
      size_t(n), 0, const_cast<std::function<void(int64_t, int64_t)>*>(&fn));
}

}  // namespace sasa_onnxruntime

namespace {

using namespace sasa_onnxruntime;

std::runtime_error error(const std::string& message) {
  return std::runtime_error("sasa_mmdet::LocalAttention: " + message);
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ")";
  return s.str();
}

// A contiguous (B, N, D, H, W) tensor as the kernel's planar view.
template <typename ptr_t>
View<ptr_t> planar(ptr_t* data, const std::vector<int64_t>& s) {
  return {data, s[1] * s[2] * s[3] * s[4], s[2] * s[3] * s[4], s[3] * s[4], s[4], 1};
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// The forward kernel for the best instruction set of this CPU, or the one
// $SASA_MMDET_ONNXRUNTIME_ISA names.
void (*choose_forward())(const ForwardCall&) {
  const char* asked = std::getenv("SASA_MMDET_ONNXRUNTIME_ISA");
  const std::string isa = asked && *asked ? asked : cpu_has_avx512() ? "avx512"
                                                    : cpu_has_avx2()   ? "avx2"
                                                                       : "baseline";
  if (isa == "baseline") return forward_baseline;
  if (isa == "avx2" && cpu_has_avx2()) return forward_avx2;
  if (isa == "avx512" && cpu_has_avx512()) return forward_avx512;
  if (isa == "avx2" || isa == "avx512")
    throw error("SASA_MMDET_ONNXRUNTIME_ISA=" + isa + ": this CPU does not have " + isa);
  throw error("SASA_MMDET_ONNXRUNTIME_ISA must be baseline, avx2 or avx512, got '" + isa + "'");
}

// An optional attribute, or `otherwise` when the node does not have it.
template <typename T>
T optional_attribute(const Ort::ConstKernelInfo& info, const char* name, T otherwise) {
  try {
    if constexpr (std::is_same_v<T, std::vector<int64_t>>)
      return info.GetAttributes<int64_t>(name);
    else
      return info.GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
    return otherwise;
  }
}

struct LocalAttentionKernel {
  int64_t kh, kw, dh, dw, heads, pool_h, pool_w;
  bool with_key, with_rel, relu;
  void (*forward)(const ForwardCall&);

  explicit LocalAttentionKernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo attributes(info);
    const auto window = attributes.GetAttributes<int64_t>("window");
    const auto dilation = attributes.GetAttributes<int64_t>("dilation");
    heads = attributes.GetAttribute<int64_t>("heads");
    const auto logits = attributes.GetAttribute<std::string>("logits");
    if (window.size() != 2 || dilation.size() != 2 || window[0] < 1 || window[1] < 1 ||
        dilation[0] < 1 || dilation[1] < 1)
      throw error("window and dilation must be two positive ints each");
    if (heads < 1) throw error("heads must be positive");
    if (logits != "qk+qr" && logits != "qk" && logits != "qr")
      throw error("logits must be 'qk+qr', 'qk' or 'qr', got '" + logits + "'");
    const auto pool = optional_attribute(attributes, "pool", std::vector<int64_t>{1, 1});
    if (pool.size() != 2 || pool[0] < 1 || pool[1] < 1)
      throw error("pool must be two positive ints");
    const auto activation = optional_attribute(attributes, "activation", std::string("none"));
    if (activation != "none" && activation != "relu")
      throw error("activation must be 'none' or 'relu', got '" + activation + "'");
    kh = window[0], kw = window[1], dh = dilation[0], dw = dilation[1];
    pool_h = pool[0], pool_w = pool[1];
    relu = activation == "relu";
    with_key = logits != "qr";
    with_rel = logits != "qk";
    forward = choose_forward();
  }

  void Compute(OrtKernelContext* raw_context) {
    Ort::KernelContext context(raw_context);
    const size_t count = context.GetInputCount();
    const auto given = [&](size_t index) {
      return index < count && static_cast<const OrtValue*>(context.GetInput(index)) != nullptr;
    };
    if (given(3) != with_rel || given(4) != with_rel)
      throw error(std::string("rel_row and rel_col (inputs 3 and 4) are ") +
                  (with_rel ? "needed" : "not taken") + " with these logits");
    if (given(5) != given(6)) throw error("scale and shift (inputs 5 and 6) come together");
    const auto query = context.GetInput(0), key = context.GetInput(1),
               value = context.GetInput(2);
    const auto input_shape = query.GetTensorTypeAndShapeInfo().GetShape();
    // Packed: query is the layer's whole projection (B, 3, N, D, H, W), q, k
    // and v one after the other; key and value are empty. The kernel reads
    // q, k and v in place (no Split, no copies).
    const bool packed = input_shape.size() == 6;
    std::vector<int64_t> q_shape = input_shape, v_shape;
    if (packed) {
      if (input_shape[1] != 3)
        throw error("a packed query must be (B, 3, N, D, H, W) (q, k, v), got " +
                    shape_string(input_shape));
      if (key.GetTensorTypeAndShapeInfo().GetElementCount() != 0 ||
          value.GetTensorTypeAndShapeInfo().GetElementCount() != 0)
        throw error("with a packed query (B, 3, N, D, H, W), key and value must be empty");
      q_shape = {input_shape[0], input_shape[2], input_shape[3], input_shape[4], input_shape[5]};
      v_shape = q_shape;
    } else {
      v_shape = value.GetTensorTypeAndShapeInfo().GetShape();
    }
    if (q_shape.size() != 5 || v_shape.size() != 5)
      throw error("query and value must be (B, N, D, H, W), or query the packed (B, 3, N, D, "
                  "H, W), got " + shape_string(input_shape) + " and " + shape_string(v_shape));
    if (q_shape[1] != heads)
      throw error("query has " + std::to_string(q_shape[1]) + " heads, the node says " +
                  std::to_string(heads));
    if (v_shape[0] != q_shape[0] || v_shape[1] != q_shape[1] || v_shape[3] != q_shape[3] ||
        v_shape[4] != q_shape[4])
      throw error("value " + shape_string(v_shape) + " must match query " +
                  shape_string(q_shape) + " in batch, heads, height and width");
    if (!packed && with_key && key.GetTensorTypeAndShapeInfo().GetShape() != q_shape)
      throw error("key " + shape_string(key.GetTensorTypeAndShapeInfo().GetShape()) +
                  " must be shaped like query " + shape_string(q_shape));
    int64_t Dr = 0, Dc = 0;
    const float *rel_row = nullptr, *rel_col = nullptr;
    if (with_rel) {
      const auto row = context.GetInput(3), col = context.GetInput(4);
      const auto r_shape = row.GetTensorTypeAndShapeInfo().GetShape();
      const auto c_shape = col.GetTensorTypeAndShapeInfo().GetShape();
      if (r_shape.size() != 3 || c_shape.size() != 3 || r_shape[0] != kh || c_shape[0] != kw ||
          r_shape[1] != heads || c_shape[1] != heads || r_shape[2] + c_shape[2] != q_shape[2])
        throw error("rel_row and rel_col must be (kh, N, Dr) and (kw, N, Dc) with Dr + Dc = D, "
                    "got " + shape_string(r_shape) + " and " + shape_string(c_shape));
      Dr = r_shape[2], Dc = c_shape[2];
      rel_row = row.GetTensorData<float>();
      rel_col = col.GetTensorData<float>();
    }
    Epilogue epilogue{pool_h, pool_w, nullptr, nullptr, relu};
    if (given(5)) {
      const auto scale = context.GetInput(5), shift = context.GetInput(6);
      const int64_t channels = v_shape[1] * v_shape[2];
      if (scale.GetTensorTypeAndShapeInfo().GetShape() != std::vector<int64_t>{channels} ||
          shift.GetTensorTypeAndShapeInfo().GetShape() != std::vector<int64_t>{channels})
        throw error("scale and shift must be (N * Dv) = (" + std::to_string(channels) +
                    "), got " + shape_string(scale.GetTensorTypeAndShapeInfo().GetShape()) +
                    " and " + shape_string(shift.GetTensorTypeAndShapeInfo().GetShape()));
      epilogue.scale = scale.GetTensorData<float>();
      epilogue.shift = shift.GetTensorData<float>();
    }
    std::vector<int64_t> out_shape = v_shape;
    out_shape[3] = (v_shape[3] + pool_h - 1) / pool_h;
    out_shape[4] = (v_shape[4] + pool_w - 1) / pool_w;
    auto out = context.GetOutput(0, out_shape);
    for (int64_t size : q_shape)
      if (size == 0) return;  // an empty batch or map: nothing to compute
    const View<const float> none{nullptr, 0, 0, 0, 0, 0};
    View<const float> q_in = planar(query.GetTensorData<float>(), q_shape), k_in = none,
                      v_in = none;
    if (packed) {
      const int64_t projection = q_in.sb;  // N * D * H * W
      q_in.sb *= 3;
      v_in = q_in, v_in.data += 2 * projection;
      if (with_key) k_in = q_in, k_in.data += projection;
    } else {
      if (with_key) k_in = planar(key.GetTensorData<float>(), q_shape);
      v_in = planar(value.GetTensorData<float>(), v_shape);
    }
    const ForwardCall call{q_shape[0], q_shape[3], q_shape[4], q_shape[1], q_shape[2],
                           v_shape[2], kh, kw, dh, dw, Dr, Dc, q_in, k_in, v_in, rel_row,
                           rel_col, planar(out.GetTensorMutableData<float>(), out_shape),
                           epilogue};
    current_context = &context;
    run_on_one_thread = double(call.B) * call.H * call.W * call.N * call.kh * call.kw *
                            (call.D + call.Dv) < kMinParallelWork;
    try {
      forward(call);
    } catch (...) {
      current_context = nullptr;
      throw;
    }
    current_context = nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) noexcept {
    try {
      Compute(context);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
    }
  }
};

struct LocalAttentionOp
    : Ort::CustomOpBase<LocalAttentionOp, LocalAttentionKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const
      noexcept {
    try {
      *kernel = new LocalAttentionKernel(info);
      return nullptr;
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
  }
  const char* GetName() const { return "LocalAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
};

// The domains must outlive every session that uses them.
std::mutex domains_mutex;
std::vector<Ort::CustomOpDomain> domains;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // This onnxruntime is older than the headers the library was built with;
    // every version's API starts with CreateStatus.
    const std::string message =
        "the sasa_mmdet custom-op library needs onnxruntime API version " +
        std::to_string(ORT_API_VERSION) + " or later; this onnxruntime is " +
        api_base->GetVersionString();
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  static LocalAttentionOp op;
  try {
    Ort::CustomOpDomain domain("sasa_mmdet");
    domain.Add(&op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(domains_mutex);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
  return nullptr;
}
