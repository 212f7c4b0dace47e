// ONNX Runtime custom-operator library: the gspn::GSPNScan operator (SPEC.md section 7) and the
// fused scan gspn::GSPNFusedScan (docs/operator.md, "The fused scan") for the CPU execution
// provider, float32 and float16.
//
// Every input is validated here, once, before the kernel runs; a bad one is reported as an
// ONNX Runtime error status naming the argument, what was expected and what was given.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstdint>
#include <algorithm>
#include <exception>
#include <memory>
#include <new>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "gspn_scan_kernel.h"

namespace gspn {
namespace {

constexpr const char* kDomain = "gspn";
constexpr size_t kMaxInputs = 7;

// The operators of the library. Both take data inputs (B, C, H, W) and, at kFirstWeight and the
// two inputs after it, weights or weight logits (B, G, H, W) with G dividing C.
struct OperatorSpec {
  const char* name;
  size_t input_count;
  const char* input_names[kMaxInputs];
};
constexpr size_t kFirstWeight = 2;
constexpr OperatorSpec kScanOp = {"GSPNScan", 5, {"x", "lam", "gl", "gm", "gr"}};
constexpr OperatorSpec kFusedScanOp = {
    "GSPNFusedScan", 7, {"u", "lam", "al", "am", "ar", "gate", "skip"}};

bool IsWeightInput(size_t index) { return index >= kFirstWeight && index < kFirstWeight + 3; }

OrtStatusPtr MakeError(const OperatorSpec& op, OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, (std::string(op.name) + ": " + message).c_str());
}

OrtStatusPtr InvalidArgument(const OperatorSpec& op, const std::string& message) {
  return MakeError(op, ORT_INVALID_ARGUMENT, message);
}

std::string FormatShape(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

const char* ElementTypeName(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "an unsupported element type";
  }
}

template <typename T>
constexpr ONNXTensorElementDataType kElementType = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
template <>
constexpr ONNXTensorElementDataType kElementType<float> = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
template <>
constexpr ONNXTensorElementDataType kElementType<Half> = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;

struct ScanAttributes {
  Direction direction = Direction::kTopToBottom;
  int64_t chunk = 0;
};

// A value as it can be quoted in a message: printable ASCII kept, every other byte (NUL, control,
// non-UTF-8) as \xHH, long values cut. ONNX Runtime passes messages to Python as UTF-8, so a raw
// byte 0xff in a message would turn a clear error into a decoding error.
std::string Quote(const std::string& value) {
  constexpr size_t kMaxShown = 40;
  static const char* const kHex = "0123456789abcdef";
  std::string quoted = "'";
  for (size_t i = 0; i < value.size() && i < kMaxShown; ++i) {
    const unsigned char byte = static_cast<unsigned char>(value[i]);
    if (byte >= 0x20 && byte < 0x7f && byte != '\\' && byte != '\'') {
      quoted += static_cast<char>(byte);
    } else {
      quoted += "\\x";
      quoted += kHex[byte >> 4];
      quoted += kHex[byte & 0xf];
    }
  }
  quoted += "'";
  if (value.size() > kMaxShown) quoted += " (" + std::to_string(value.size()) + " bytes)";
  return quoted;
}

// The type of a node attribute. The API has no call that returns it, so it is probed with each
// typed getter. The array getters of ONNX Runtime 1.21+ accept a present attribute of any type
// (reading no elements), and every getter fails for a missing one; an attribute counts as missing
// only when every getter fails and ONNX Runtime's message says so, so that a runtime behaving
// differently makes the node an error, never silently use a default.
enum class AttributeType { kAbsent, kInt, kFloat, kString, kInts, kFloats, kTensor, kOther };

const char* AttributeTypeName(AttributeType type) {
  switch (type) {
    case AttributeType::kAbsent: return "no attribute";
    case AttributeType::kInt: return "an int";
    case AttributeType::kFloat: return "a float";
    case AttributeType::kString: return "a string";
    case AttributeType::kInts: return "a list of ints";
    case AttributeType::kFloats: return "a list of floats";
    case AttributeType::kTensor: return "a tensor";
    default: return "an attribute of another type (an empty list, strings, a graph, ...)";
  }
}

AttributeType ProbeAttribute(const OrtApi& api, const OrtKernelInfo* info, const char* name) {
  const auto succeeded = [&api](OrtStatus* status) {
    if (status == nullptr) return true;
    api.ReleaseStatus(status);
    return false;
  };
  size_t size = 0;
  float as_float = 0.0f;
  int64_t as_int = 0;
  if (succeeded(api.KernelInfoGetAttribute_string(info, name, nullptr, &size))) {
    return AttributeType::kString;
  }
  if (succeeded(api.KernelInfoGetAttribute_float(info, name, &as_float))) {
    return AttributeType::kFloat;
  }
  OrtAllocator* allocator = nullptr;
  if (succeeded(api.GetAllocatorWithDefaultOptions(&allocator))) {
    OrtValue* tensor = nullptr;
    if (succeeded(api.KernelInfoGetAttribute_tensor(info, name, allocator, &tensor))) {
      api.ReleaseValue(tensor);
      return AttributeType::kTensor;
    }
  }
  size_t int_count = 0, float_count = 0;
  const bool ints_read =
      succeeded(api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &int_count));
  const bool floats_read =
      succeeded(api.KernelInfoGetAttributeArray_float(info, name, nullptr, &float_count));
  if (ints_read && int_count > 0) return AttributeType::kInts;
  if (floats_read && float_count > 0) return AttributeType::kFloats;
  OrtStatus* status = api.KernelInfoGetAttribute_int64(info, name, &as_int);
  if (status == nullptr) return AttributeType::kInt;
  const std::string message = api.GetErrorMessage(status);
  api.ReleaseStatus(status);
  const bool reported_missing = message.find("No attribute with name") != std::string::npos;
  return !ints_read && !floats_read && reported_missing ? AttributeType::kAbsent
                                                        : AttributeType::kOther;
}

// Reads and validates the node attributes `direction` (string, required, exactly one of t2b,
// b2t, l2r, r2l) and `chunk` (int, default 0, >= 0). An attribute present with another type is an
// error, never read as its default.
OrtStatusPtr ReadAttributes(const OperatorSpec& op, const OrtApi& api, const OrtKernelInfo* info,
                            ScanAttributes* out) {
  constexpr const char* kDirectionExpected =
      "attribute 'direction' must be a string, one of 't2b', 'b2t', 'l2r', 'r2l'; ";
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, "direction", nullptr, &size)) {
    api.ReleaseStatus(status);
    const AttributeType type = ProbeAttribute(api, info, "direction");
    if (type == AttributeType::kAbsent) {
      return InvalidArgument(op, std::string(kDirectionExpected) +
                                     "it is required and the node has none");
    }
    return InvalidArgument(op, std::string(kDirectionExpected) + "got " + AttributeTypeName(type));
  }
  std::string direction(size, '\0');
  if (OrtStatus* status =
          api.KernelInfoGetAttribute_string(info, "direction", direction.data(), &size)) {
    return status;
  }
  direction.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  if (!ParseDirection(direction.data(), direction.size(), &out->direction)) {
    return InvalidArgument(op, std::string(kDirectionExpected) + "got " + Quote(direction));
  }

  int64_t chunk = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, "chunk", &chunk)) {
    api.ReleaseStatus(status);
    const AttributeType type = ProbeAttribute(api, info, "chunk");
    if (type != AttributeType::kAbsent) {  // absent means the default 0
      return InvalidArgument(
          op, std::string("attribute 'chunk' must be an int >= 0 (0: global propagation); got ") +
          AttributeTypeName(type));
    }
    chunk = 0;
  }
  if (chunk < 0) {
    return InvalidArgument(
        op, "attribute 'chunk' must be an int >= 0 (0: global propagation); got " +
        std::to_string(chunk));
  }
  out->chunk = chunk;
  return nullptr;
}

// Work of one call, split into tasks of adjacent (b, c) planes. Each task allocates its own
// bounded scratch and frees it before returning: nothing outlives the call.
struct ScanJob {
  ScanGeometry geometry;
  const void* inputs[kMaxInputs];
  void* output;
  int64_t planes = 0;
  int64_t tasks = 0;
  size_t scratch_floats = 0;
  std::atomic<bool> out_of_memory{false};
};

// Enough tasks to balance any intra-op thread count; few enough that their scratch allocations
// cost nothing next to the planes they scan.
constexpr int64_t kMaxTasks = 64;

template <typename T, bool kFused>
void RunTask(void* user_data, size_t task) {
  ScanJob& job = *static_cast<ScanJob*>(user_data);
  // b2t scans rows bottom to top: its tasks take the planes last to first too, so that the
  // tasks a worker runs in turn stay one descending stream (see DescendingPlanes in the kernel).
  if (job.geometry.direction == Direction::kBottomToTop) task = static_cast<size_t>(job.tasks) - 1 - task;
  const int64_t first = static_cast<int64_t>(task) * job.planes / job.tasks;
  const int64_t last = (static_cast<int64_t>(task) + 1) * job.planes / job.tasks;
  std::unique_ptr<float[]> scratch;
  if (job.scratch_floats > 0) {
    scratch.reset(new (std::nothrow) float[job.scratch_floats]);
    if (!scratch) {
      job.out_of_memory.store(true, std::memory_order_relaxed);
      return;
    }
  }
  const auto input = [&job](size_t index) { return static_cast<const T*>(job.inputs[index]); };
  T* output = static_cast<T*>(job.output);
  if constexpr (kFused) {
    FusedScanPlanes<T>(job.geometry, first, last - first, input(0), input(1), input(2), input(3),
                       input(4), input(5), input(6), output, scratch.get());
  } else {
    ScanPlanes<T>(job.geometry, first, last - first, input(0), input(1), input(2), input(3),
                  input(4), output, scratch.get());
  }
}

// The kernel of one node of either operator: `op` says which (its name, its inputs), kFused picks
// the plane function.
template <bool kFused>
class GSPNScanKernel {
 public:
  static constexpr const OperatorSpec& op = kFused ? kFusedScanOp : kScanOp;

  explicit GSPNScanKernel(const ScanAttributes& attributes) : attributes_(attributes) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    try {
      return Compute(Ort::KernelContext(raw_context));
    } catch (const Ort::Exception& error) {
      return MakeError(op, error.GetOrtErrorCode(), error.what());
    } catch (const std::exception& error) {
      return MakeError(op, ORT_FAIL, error.what());
    }
  }

 private:
  static std::string Quoted(size_t input) { return std::string("'") + op.input_names[input] + "'"; }

  // Element types and shapes of every input against the operator's contract; nullptr when valid.
  static OrtStatusPtr Validate(const std::vector<int64_t>* shapes,
                               const ONNXTensorElementDataType* types) {
    const size_t count = op.input_count;
    if (types[0] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
        types[0] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      return InvalidArgument(op, "input " + Quoted(0) + " must be float32 or float16; got " +
                                     ElementTypeName(types[0]));
    }
    for (size_t i = 1; i < count; ++i) {
      if (types[i] != types[0]) {
        return InvalidArgument(op, "input " + Quoted(i) + " must have the element type of " +
                                       Quoted(0) + " (" + ElementTypeName(types[0]) + "); got " +
                                       ElementTypeName(types[i]));
      }
    }
    for (size_t i = 0; i < count; ++i) {
      const char* layout = IsWeightInput(i) ? "(B, G, H, W)" : "(B, C, H, W)";
      if (shapes[i].size() != 4) {
        return InvalidArgument(op, "input " + Quoted(i) + " must be 4-D " + layout + "; got rank " +
                                       std::to_string(shapes[i].size()) + ", shape " +
                                       FormatShape(shapes[i]));
      }
      for (int64_t dim : shapes[i]) {
        if (dim <= 0) {
          return InvalidArgument(op, "input " + Quoted(i) +
                                         " must not be empty (every dimension >= 1); got shape " +
                                         FormatShape(shapes[i]));
        }
      }
    }
    const std::vector<int64_t>& data_shape = shapes[0];
    for (size_t i = 1; i < count; ++i) {
      if (!IsWeightInput(i) && shapes[i] != data_shape) {
        return InvalidArgument(op, "input " + Quoted(i) + " must have the shape of " + Quoted(0) +
                                       " " + FormatShape(data_shape) + "; got " +
                                       FormatShape(shapes[i]));
      }
    }
    const std::vector<int64_t>& weight_shape = shapes[kFirstWeight];
    if (weight_shape[0] != data_shape[0] || weight_shape[2] != data_shape[2] ||
        weight_shape[3] != data_shape[3]) {
      return InvalidArgument(op, "input " + Quoted(kFirstWeight) + " must have shape (B, G, H, W) = (" +
                                     std::to_string(data_shape[0]) + ", G, " +
                                     std::to_string(data_shape[2]) + ", " +
                                     std::to_string(data_shape[3]) + ") to match " + Quoted(0) +
                                     " " + FormatShape(data_shape) + "; got " +
                                     FormatShape(weight_shape));
    }
    if (data_shape[1] % weight_shape[1] != 0) {
      return InvalidArgument(op, "the weight groups G = " + std::to_string(weight_shape[1]) +
                                     " of " + Quoted(kFirstWeight) + " " +
                                     FormatShape(weight_shape) + " must divide the channels C = " +
                                     std::to_string(data_shape[1]) + " of " + Quoted(0));
    }
    for (size_t i = kFirstWeight + 1; i < count; ++i) {
      if (IsWeightInput(i) && shapes[i] != weight_shape) {
        return InvalidArgument(op, "input " + Quoted(i) + " must have the shape of " +
                                       Quoted(kFirstWeight) + " " + FormatShape(weight_shape) +
                                       "; got " + FormatShape(shapes[i]));
      }
    }
    return nullptr;
  }

  OrtStatusPtr Compute(Ort::KernelContext context) {
    const size_t count = op.input_count;
    if (context.GetInputCount() != count) {
      std::string names;
      for (size_t i = 0; i < count; ++i) names += (i ? ", " : "") + std::string(op.input_names[i]);
      return InvalidArgument(op, "expected " + std::to_string(count) + " inputs (" + names +
                                     "); got " + std::to_string(context.GetInputCount()));
    }
    std::vector<int64_t> shapes[kMaxInputs];
    ONNXTensorElementDataType types[kMaxInputs];
    const void* data[kMaxInputs];
    for (size_t i = 0; i < count; ++i) {
      Ort::ConstValue value = context.GetInput(i);
      if (!value) return InvalidArgument(op, "input " + Quoted(i) + " is missing");
      if (!value.IsTensor()) {
        return InvalidArgument(op, "input " + Quoted(i) + " must be a tensor; got a non-tensor value");
      }
      Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
      types[i] = info.GetElementType();
      shapes[i] = info.GetShape();
      data[i] = value.GetTensorRawData();
    }
    if (OrtStatusPtr status = Validate(shapes, types)) return status;

    const std::vector<int64_t>& data_shape = shapes[0];
    ScanJob job;
    job.geometry.batch = data_shape[0];
    job.geometry.channels = data_shape[1];
    job.geometry.groups = shapes[kFirstWeight][1];
    job.geometry.height = data_shape[2];
    job.geometry.width = data_shape[3];
    job.geometry.direction = attributes_.direction;
    job.geometry.chunk = attributes_.chunk;
    for (size_t i = 0; i < count; ++i) job.inputs[i] = data[i];
    Ort::UnownedValue output = context.GetOutput(0, data_shape);
    job.output = output.GetTensorMutableRawData();

    const bool half = types[0] == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    job.planes = data_shape[0] * data_shape[1];
    job.tasks = std::min(job.planes, kMaxTasks);
    job.scratch_floats =
        kFused ? FusedScratchFloats(job.geometry, half) : ScratchFloats(job.geometry, half);
    context.ParallelFor(half ? &RunTask<Half, kFused> : &RunTask<float, kFused>,
                        static_cast<size_t>(job.tasks), 0, &job);
    if (job.out_of_memory.load()) {
      return MakeError(op, ORT_FAIL, "out of memory allocating " +
                                         std::to_string(job.scratch_floats * sizeof(float)) +
                                         " bytes of scan scratch");
    }
    return nullptr;
  }

  ScanAttributes attributes_;
};

template <typename T, bool kFused>
struct GSPNScanOp
    : Ort::CustomOpBase<GSPNScanOp<T, kFused>, GSPNScanKernel<kFused>, /*WithStatus=*/true> {
  static constexpr const OperatorSpec& op = GSPNScanKernel<kFused>::op;

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    ScanAttributes attributes;
    if (OrtStatusPtr status = ReadAttributes(op, api, info, &attributes)) return status;
    *kernel = new (std::nothrow) GSPNScanKernel<kFused>(attributes);
    if (*kernel == nullptr) return MakeError(op, ORT_FAIL, "out of memory creating the kernel");
    return nullptr;
  }

  const char* GetName() const { return op.name; }
  size_t GetInputTypeCount() const { return op.input_count; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kElementType<T>; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kElementType<T>; }
};

// The kernels this library provides, all in domain "gspn". ONNX Runtime picks the one whose
// op type and input type match the node.
GSPNScanOp<float, false> scan_float32;
GSPNScanOp<Half, false> scan_float16;
GSPNScanOp<float, true> fused_scan_float32;
GSPNScanOp<Half, true> fused_scan_float16;
OrtCustomOp* const kKernelTable[] = {&scan_float32, &scan_float16, &fused_scan_float32,
                                     &fused_scan_float16};

Ort::CustomOpDomain* SharedDomain() {
  // One domain object for the process; ONNX Runtime keeps a pointer to it in every session.
  static Ort::CustomOpDomain* domain = [] {
    auto* created = new Ort::CustomOpDomain(kDomain);
    for (OrtCustomOp* op : kKernelTable) created->Add(op);
    return created;
  }();
  return domain;
}

}  // namespace
}  // namespace gspn

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* oldest = api_base->GetApi(1);
    const std::string message = std::string("the gspn custom-op library needs ONNX Runtime API ") +
                                std::to_string(ORT_API_VERSION) + " or newer; this runtime is " +
                                api_base->GetVersionString();
    return oldest ? oldest->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions(options).Add(*gspn::SharedDomain());
  } catch (const Ort::Exception& error) {
    return api->CreateStatus(error.GetOrtErrorCode(), error.what());
  } catch (const std::exception& error) {
    return api->CreateStatus(ORT_FAIL, error.what());
  }
  return nullptr;
}
