// Runs an exported GSPN model in ONNX Runtime from C++, with no Python in the process.
//
//   gspn_onnx_run MODEL.onnx CUSTOM_OP_LIBRARY.so INPUTS.bin OUTPUTS.bin
//
// INPUTS.bin holds the model's float32 inputs in the order of the graph inputs, OUTPUTS.bin
// receives every output, both in this layout (little-endian):
//   int64 count; then per tensor: int64 rank, int64 dims[rank], float32 data[prod(dims)]
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Tensor {
  std::vector<int64_t> dims;
  std::vector<float> data;
};

template <typename T>
void ReadValue(std::istream& in, T* value, const std::string& what) {
  if (!in.read(reinterpret_cast<char*>(value), sizeof(T))) {
    throw std::runtime_error("truncated tensor file while reading " + what);
  }
}

std::vector<Tensor> ReadTensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  int64_t count = 0;
  ReadValue(in, &count, "the tensor count");
  if (count < 0 || count > 1024) throw std::runtime_error("implausible tensor count in " + path);
  std::vector<Tensor> tensors(static_cast<size_t>(count));
  for (Tensor& tensor : tensors) {
    int64_t rank = 0;
    ReadValue(in, &rank, "a rank");
    if (rank < 0 || rank > 8) throw std::runtime_error("implausible rank in " + path);
    tensor.dims.resize(static_cast<size_t>(rank));
    int64_t elements = 1;
    for (int64_t& dim : tensor.dims) {
      ReadValue(in, &dim, "a dimension");
      if (dim < 0) throw std::runtime_error("negative dimension in " + path);
      elements *= dim;
    }
    tensor.data.resize(static_cast<size_t>(elements));
    if (!in.read(reinterpret_cast<char*>(tensor.data.data()),
                 static_cast<std::streamsize>(elements * sizeof(float)))) {
      throw std::runtime_error("truncated tensor data in " + path);
    }
  }
  return tensors;
}

void WriteTensors(const std::string& path, const std::vector<Ort::Value>& values) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  const int64_t count = static_cast<int64_t>(values.size());
  out.write(reinterpret_cast<const char*>(&count), sizeof(count));
  for (const Ort::Value& value : values) {
    Ort::TensorTypeAndShapeInfo info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      throw std::runtime_error("this example writes float32 outputs only");
    }
    const std::vector<int64_t> dims = info.GetShape();
    const int64_t rank = static_cast<int64_t>(dims.size());
    out.write(reinterpret_cast<const char*>(&rank), sizeof(rank));
    out.write(reinterpret_cast<const char*>(dims.data()),
              static_cast<std::streamsize>(dims.size() * sizeof(int64_t)));
    out.write(reinterpret_cast<const char*>(value.GetTensorData<float>()),
              static_cast<std::streamsize>(info.GetElementCount() * sizeof(float)));
  }
  if (!out) throw std::runtime_error("failed writing " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx CUSTOM_OP_LIBRARY.so INPUTS.bin OUTPUTS.bin\n";
    return 2;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "gspn_onnx_run");
    Ort::SessionOptions options;
    options.RegisterCustomOpsLibrary(argv[2]);  // registers domain "gspn" from the library
    Ort::Session session(env, argv[1], options);

    std::vector<Tensor> inputs = ReadTensors(argv[3]);
    if (inputs.size() != session.GetInputCount()) {
      throw std::runtime_error("the model has " + std::to_string(session.GetInputCount()) +
                               " inputs; " + argv[3] + " holds " + std::to_string(inputs.size()));
    }
    Ort::AllocatorWithDefaultOptions allocator;
    std::vector<Ort::AllocatedStringPtr> name_storage;
    std::vector<const char*> input_names, output_names;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      name_storage.push_back(session.GetInputNameAllocated(i, allocator));
      input_names.push_back(name_storage.back().get());
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i) {
      name_storage.push_back(session.GetOutputNameAllocated(i, allocator));
      output_names.push_back(name_storage.back().get());
    }

    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> input_values;
    for (Tensor& tensor : inputs) {
      input_values.push_back(Ort::Value::CreateTensor<float>(
          memory, tensor.data.data(), tensor.data.size(), tensor.dims.data(), tensor.dims.size()));
    }
    std::vector<Ort::Value> outputs =
        session.Run(Ort::RunOptions{nullptr}, input_names.data(), input_values.data(),
                    input_values.size(), output_names.data(), output_names.size());
    WriteTensors(argv[4], outputs);
    std::cout << "ran " << argv[1] << ": " << outputs.size() << " output(s) written to "
              << argv[4] << "\n";
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
