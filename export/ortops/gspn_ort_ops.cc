// ONNX Runtime custom-operator library: the gspn::GSPNScan operator (SPEC.md section 7) for the
// CPU execution provider, float32 and float16.
//
// Every input is validated here, once, before the kernel runs; a bad one is reported as an
// ONNX Runtime error status naming the argument, what was expected and what was given.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "gspn_scan_kernel.h"

namespace gspn {
namespace {

constexpr const char* kDomain = "gspn";
constexpr const char* kOpName = "GSPNScan";
constexpr size_t kInputCount = 5;
constexpr const char* kInputNames[kInputCount] = {"x", "lam", "gl", "gm", "gr"};

OrtStatusPtr MakeError(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, (std::string(kOpName) + ": " + message).c_str());
}

OrtStatusPtr InvalidArgument(const std::string& message) {
  return MakeError(ORT_INVALID_ARGUMENT, message);
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

// Reads and validates the node attributes `direction` (string, required) and `chunk` (int,
// default 0, >= 0).
OrtStatusPtr ReadAttributes(const OrtApi& api, const OrtKernelInfo* info, ScanAttributes* out) {
  size_t size = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_string(info, "direction", nullptr, &size)) {
    api.ReleaseStatus(status);
    return InvalidArgument(
        "attribute 'direction' is required: expected a string, one of t2b, b2t, l2r, r2l; "
        "the node has no string attribute of that name");
  }
  std::string direction(size, '\0');
  if (OrtStatus* status =
          api.KernelInfoGetAttribute_string(info, "direction", direction.data(), &size)) {
    return status;
  }
  direction.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  if (!ParseDirection(direction.c_str(), &out->direction)) {
    return InvalidArgument("attribute 'direction' must be one of t2b, b2t, l2r, r2l; got '" +
                           direction + "'");
  }

  int64_t chunk = 0;
  if (OrtStatus* status = api.KernelInfoGetAttribute_int64(info, "chunk", &chunk)) {
    api.ReleaseStatus(status);
    // Absent means the default 0; present with another type is an error.
    float as_float = 0.0f;
    size_t string_size = 0;
    OrtStatus* float_status = api.KernelInfoGetAttribute_float(info, "chunk", &as_float);
    OrtStatus* string_status =
        api.KernelInfoGetAttribute_string(info, "chunk", nullptr, &string_size);
    const bool present_with_other_type = float_status == nullptr || string_status == nullptr;
    if (float_status) api.ReleaseStatus(float_status);
    if (string_status) api.ReleaseStatus(string_status);
    if (present_with_other_type) {
      return InvalidArgument("attribute 'chunk' must be an int (>= 0); got another type");
    }
    chunk = 0;
  }
  if (chunk < 0) {
    return InvalidArgument("attribute 'chunk' must be >= 0 (0: global propagation); got " +
                           std::to_string(chunk));
  }
  out->chunk = chunk;
  return nullptr;
}

struct ScanJob {
  ScanGeometry geometry;
  const void* inputs[kInputCount];
  void* output;
  std::atomic<bool> out_of_memory{false};
};

template <typename T>
void RunPlane(void* user_data, size_t plane) {
  ScanJob& job = *static_cast<ScanJob*>(user_data);
  const bool ok = ScanPlane<T>(
      job.geometry, static_cast<int64_t>(plane), static_cast<const T*>(job.inputs[0]),
      static_cast<const T*>(job.inputs[1]), static_cast<const T*>(job.inputs[2]),
      static_cast<const T*>(job.inputs[3]), static_cast<const T*>(job.inputs[4]),
      static_cast<T*>(job.output));
  if (!ok) job.out_of_memory.store(true, std::memory_order_relaxed);
}

class GSPNScanKernel {
 public:
  explicit GSPNScanKernel(const ScanAttributes& attributes) : attributes_(attributes) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* raw_context) {
    try {
      return Compute(Ort::KernelContext(raw_context));
    } catch (const Ort::Exception& error) {
      return MakeError(error.GetOrtErrorCode(), error.what());
    } catch (const std::exception& error) {
      return MakeError(ORT_FAIL, error.what());
    }
  }

 private:
  OrtStatusPtr Compute(Ort::KernelContext context) {
    if (context.GetInputCount() != kInputCount) {
      return InvalidArgument("expected 5 inputs (x, lam, gl, gm, gr); got " +
                             std::to_string(context.GetInputCount()));
    }
    std::vector<int64_t> shapes[kInputCount];
    ONNXTensorElementDataType types[kInputCount];
    const void* data[kInputCount];
    for (size_t i = 0; i < kInputCount; ++i) {
      Ort::ConstValue value = context.GetInput(i);
      if (!value) {
        return InvalidArgument(std::string("input '") + kInputNames[i] + "' is missing");
      }
      if (!value.IsTensor()) {
        return InvalidArgument(std::string("input '") + kInputNames[i] +
                               "' must be a tensor; got a non-tensor value");
      }
      Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
      types[i] = info.GetElementType();
      shapes[i] = info.GetShape();
      data[i] = value.GetTensorRawData();
    }

    if (types[0] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
        types[0] != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      return InvalidArgument(std::string("input 'x' must be float32 or float16; got ") +
                             ElementTypeName(types[0]));
    }
    for (size_t i = 1; i < kInputCount; ++i) {
      if (types[i] != types[0]) {
        return InvalidArgument(std::string("input '") + kInputNames[i] +
                               "' must have the element type of 'x' (" +
                               ElementTypeName(types[0]) + "); got " + ElementTypeName(types[i]));
      }
    }
    for (size_t i = 0; i < kInputCount; ++i) {
      const char* layout = i < 2 ? "(B, C, H, W)" : "(B, G, H, W)";
      if (shapes[i].size() != 4) {
        return InvalidArgument(std::string("input '") + kInputNames[i] + "' must be 4-D " +
                               layout + "; got rank " + std::to_string(shapes[i].size()) +
                               ", shape " + FormatShape(shapes[i]));
      }
      for (int64_t dim : shapes[i]) {
        if (dim <= 0) {
          return InvalidArgument(std::string("input '") + kInputNames[i] +
                                 "' must not be empty (every dimension >= 1); got shape " +
                                 FormatShape(shapes[i]));
        }
      }
    }
    const std::vector<int64_t>& x_shape = shapes[0];
    if (shapes[1] != x_shape) {
      return InvalidArgument("input 'lam' must have the shape of 'x' " + FormatShape(x_shape) +
                             "; got " + FormatShape(shapes[1]));
    }
    const std::vector<int64_t>& gl_shape = shapes[2];
    if (gl_shape[0] != x_shape[0] || gl_shape[2] != x_shape[2] || gl_shape[3] != x_shape[3]) {
      return InvalidArgument("input 'gl' must have shape (B, G, H, W) = (" +
                             std::to_string(x_shape[0]) + ", G, " + std::to_string(x_shape[2]) +
                             ", " + std::to_string(x_shape[3]) + ") to match 'x' " +
                             FormatShape(x_shape) + "; got " + FormatShape(gl_shape));
    }
    if (x_shape[1] % gl_shape[1] != 0) {
      return InvalidArgument("the weight groups G = " + std::to_string(gl_shape[1]) +
                             " of 'gl' " + FormatShape(gl_shape) +
                             " must divide the channels C = " + std::to_string(x_shape[1]) +
                             " of 'x'");
    }
    for (size_t i = 3; i < kInputCount; ++i) {
      if (shapes[i] != gl_shape) {
        return InvalidArgument(std::string("input '") + kInputNames[i] +
                               "' must have the shape of 'gl' " + FormatShape(gl_shape) +
                               "; got " + FormatShape(shapes[i]));
      }
    }

    ScanJob job;
    job.geometry.batch = x_shape[0];
    job.geometry.channels = x_shape[1];
    job.geometry.groups = gl_shape[1];
    job.geometry.height = x_shape[2];
    job.geometry.width = x_shape[3];
    job.geometry.direction = attributes_.direction;
    job.geometry.chunk = attributes_.chunk;
    for (size_t i = 0; i < kInputCount; ++i) job.inputs[i] = data[i];
    Ort::UnownedValue output = context.GetOutput(0, x_shape);
    job.output = output.GetTensorMutableRawData();

    const size_t planes = static_cast<size_t>(x_shape[0] * x_shape[1]);
    if (types[0] == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      context.ParallelFor(&RunPlane<float>, planes, 0, &job);
    } else {
      context.ParallelFor(&RunPlane<Half>, planes, 0, &job);
    }
    if (job.out_of_memory.load()) {
      return MakeError(ORT_FAIL, "out of memory allocating the per-thread line buffers");
    }
    return nullptr;
  }

  ScanAttributes attributes_;
};

template <typename T>
struct GSPNScanOp : Ort::CustomOpBase<GSPNScanOp<T>, GSPNScanKernel, /*WithStatus=*/true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    ScanAttributes attributes;
    if (OrtStatusPtr status = ReadAttributes(api, info, &attributes)) return status;
    *kernel = new (std::nothrow) GSPNScanKernel(attributes);
    if (*kernel == nullptr) return MakeError(ORT_FAIL, "out of memory creating the kernel");
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  size_t GetInputTypeCount() const { return kInputCount; }
  ONNXTensorElementDataType GetInputType(size_t) const { return kElementType<T>; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return kElementType<T>; }
};

// The kernels this library provides, all in domain "gspn". ONNX Runtime picks the one whose
// input type matches the node.
GSPNScanOp<float> scan_float32;
GSPNScanOp<Half> scan_float16;
OrtCustomOp* const kKernelTable[] = {&scan_float32, &scan_float16};

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
