// One CUDA kernel as an MLX primitive: compiled once per machine and source (NVRTC, when it
// first runs; later processes load the machine code from disk), then every call only builds the
// primitive and every evaluation adds one kernel node to MLX's CUDA graph.
//
// Why not mx.fast.cuda_kernel: that call assembles the kernel's whole source string and looks the
// module up by name on every call (about 20 µs per layer on an H200 for an empty kernel, see
// docs/perf-log.md). Here each source is made ready once per process and its CUfunction kept.
//
// Only symbols that libmlx.so exports are used (CommandEncoder, Device, allocator, array); MLX's
// JIT module cache is not exported, so the compile is done here with NVRTC, with the options MLX
// gives its own custom kernels (--gpu-architecture=sm_XY, CCCL and CUDA include paths), so the
// machine code is the one mx.fast.cuda_kernel would get. NVRTC and the driver API resolve from
// libnvrtc.so.13 and libcuda.so.1, which libmlx.so already loads.

#include <dlfcn.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <cuda.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/common/utils.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "mlx/primitives.h"
#include "mlx/stream.h"

namespace nb = nanobind;
namespace mx = mlx::core;

// The NVRTC entry points used here (nvrtc.h's declarations; its result type is an int enum).
extern "C" {
typedef struct _nvrtcProgram* nvrtcProgram;
int nvrtcCreateProgram(nvrtcProgram*, const char*, const char*, int, const char* const*,
                       const char* const*);
int nvrtcAddNameExpression(nvrtcProgram, const char*);
int nvrtcCompileProgram(nvrtcProgram, int, const char* const*);
int nvrtcGetProgramLogSize(nvrtcProgram, size_t*);
int nvrtcGetProgramLog(nvrtcProgram, char*);
int nvrtcGetCUBINSize(nvrtcProgram, size_t*);
int nvrtcGetCUBIN(nvrtcProgram, char*);
int nvrtcGetLoweredName(nvrtcProgram, const char*, const char**);
int nvrtcDestroyProgram(nvrtcProgram*);
int nvrtcVersion(int*, int*);
const char* nvrtcGetErrorString(int);
}

namespace fusedqk {

void check_nvrtc(int result, const char* what) {
  if (result != 0) {
    throw std::runtime_error(std::string("fusedqk primitive: ") + what + " failed: " +
                             nvrtcGetErrorString(result));
  }
}

void check_cu(CUresult result, const char* what) {
  if (result != CUDA_SUCCESS) {
    const char* text = nullptr;
    cuGetErrorString(result, &text);
    throw std::runtime_error(std::string("fusedqk primitive: ") + what + " failed: " +
                             (text ? text : "unknown CUDA error"));
  }
}

// The folder holding libmlx.so's package (site-packages/mlx), found from a symbol it exports.
std::filesystem::path mlx_root() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&mx::cu::get_command_encoder), &info) && info.dli_fname) {
    return std::filesystem::path(info.dli_fname).parent_path().parent_path();
  }
  return {};
}

// The CUDA headers, where MLX 0.32.4's JIT takes them: the nvidia-cuda-runtime wheel beside the
// mlx package (site-packages/nvidia/cu13/include), else CUDA_HOME, CUDA_PATH, /usr/local/cuda.
// fusedqk/doctor.py (cuda_include_dirs) follows the same order.
std::string cuda_include() {
  if (auto root = mlx_root(); !root.empty()) {
    auto wheel = root.parent_path() / "nvidia" / "cu13" / "include";
    if (std::filesystem::exists(wheel)) return wheel.string();
  }
  for (const char* name : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const char* v = std::getenv(name); v && *v) return std::string(v) + "/include";
  }
  return "/usr/local/cuda/include";
}

// The CCCL headers that ship beside libmlx.so (mlx/include/cccl), as MLX's JIT finds them.
std::string cccl_dir() {
  if (auto root = mlx_root(); !root.empty()) {
    auto dir = root / "include" / "cccl";
    if (std::filesystem::exists(dir)) return dir.string();
  }
  return "";
}

struct CompiledModule {
  CUmodule module = nullptr;
  CUfunction function = nullptr;
  size_t cubin_bytes = 0;
};

// What NVRTC makes of one source: the machine code and the kernel's mangled name in it.
struct Cubin {
  std::string code;
  std::string mangled;
};

Cubin nvrtc_compile(const std::string& source, const std::string& file_name,
                    const std::string& kernel_name, int major, int minor) {
  nvrtcProgram prog = nullptr;
  check_nvrtc(nvrtcCreateProgram(&prog, source.c_str(), file_name.c_str(), 0, nullptr, nullptr),
              "nvrtcCreateProgram");
  std::unique_ptr<nvrtcProgram, void (*)(nvrtcProgram*)> release(
      &prog, [](nvrtcProgram* p) { nvrtcDestroyProgram(p); });
  check_nvrtc(nvrtcAddNameExpression(prog, kernel_name.c_str()), "nvrtcAddNameExpression");
  std::vector<std::string> options = {"--gpu-architecture=sm_" + std::to_string(major) +
                                      std::to_string(minor)};
  if (auto cccl = cccl_dir(); !cccl.empty()) options.push_back("--include-path=" + cccl);
  options.push_back("--include-path=" + cuda_include());
  std::vector<const char*> argv;
  for (auto& o : options) argv.push_back(o.c_str());
  if (int r = nvrtcCompileProgram(prog, static_cast<int>(argv.size()), argv.data()); r != 0) {
    size_t size = 0;
    nvrtcGetProgramLogSize(prog, &size);
    std::string log(size, '\0');
    nvrtcGetProgramLog(prog, log.data());
    throw std::runtime_error("fusedqk primitive: NVRTC could not compile " + file_name + ": " +
                             log);
  }
  const char* lowered = nullptr;
  check_nvrtc(nvrtcGetLoweredName(prog, kernel_name.c_str(), &lowered), "nvrtcGetLoweredName");
  Cubin out;
  out.mangled = lowered;
  size_t size = 0;
  check_nvrtc(nvrtcGetCUBINSize(prog, &size), "nvrtcGetCUBINSize");
  out.code.assign(size, '\0');
  check_nvrtc(nvrtcGetCUBIN(prog, out.code.data()), "nvrtcGetCUBIN");
  return out;
}

CompiledModule load_module(const Cubin& cubin) {
  CompiledModule out;
  out.cubin_bytes = cubin.code.size();
  check_cu(cuModuleLoadData(&out.module, cubin.code.data()), "cuModuleLoadData");
  if (CUresult r = cuModuleGetFunction(&out.function, out.module, cubin.mangled.c_str());
      r != CUDA_SUCCESS) {
    cuModuleUnload(out.module);
    check_cu(r, "cuModuleGetFunction");
  }
  return out;
}

// The on-disk copy of compiled kernels: beside MLX's own compiled kernels, in
// $MLX_PTX_CACHE_DIR/fusedqk (fusedqk points that variable at its shared cache, one folder per
// kind of GPU and MLX version), so a later process loads the machine code instead of paying
// NVRTC again (1-2 s per source on an H200). A file holds its full key, checked on reading, so
// a hash collision or a torn file is a miss, never a wrong kernel. No folder: no disk copy.
std::filesystem::path disk_file(const std::string& key) {
  const char* dir = std::getenv("MLX_PTX_CACHE_DIR");
  if (!dir || !*dir) return {};
  uint64_t hash = 1469598103934665603ull;  // FNV-1a: stable across builds, unlike std::hash
  for (unsigned char c : key) hash = (hash ^ c) * 1099511628211ull;
  char name[40];
  std::snprintf(name, sizeof name, "%016llx.cubin", static_cast<unsigned long long>(hash));
  return std::filesystem::path(dir) / "fusedqk" / name;
}

constexpr char kDiskMagic[] = "fusedqk-cubin/1";

void put_string(std::string& out, const std::string& s) {
  uint64_t n = s.size();
  out.append(reinterpret_cast<const char*>(&n), sizeof n);
  out += s;
}

bool take_string(const std::string& in, size_t& at, std::string& s) {
  uint64_t n = 0;
  if (in.size() - at < sizeof n) return false;
  std::memcpy(&n, in.data() + at, sizeof n);
  at += sizeof n;
  if (in.size() - at < n) return false;
  s.assign(in, at, n);
  at += n;
  return true;
}

bool read_disk(const std::filesystem::path& file, const std::string& key, Cubin& cubin) {
  if (file.empty()) return false;
  std::ifstream f(file, std::ios::binary);
  if (!f) return false;
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t at = 0;
  std::string magic, stored_key;
  return take_string(data, at, magic) && magic == kDiskMagic &&
         take_string(data, at, stored_key) && stored_key == key &&
         take_string(data, at, cubin.mangled) && take_string(data, at, cubin.code) &&
         at == data.size() && !cubin.code.empty();
}

// Written whole to a temporary file and renamed: a concurrent reader sees the old file, the
// new one, or none. Failing to write is not an error (the kernel still runs).
void write_disk(const std::filesystem::path& file, const std::string& key, const Cubin& cubin) {
  if (file.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(file.parent_path(), ec);
  std::string data;
  put_string(data, kDiskMagic);
  put_string(data, key);
  put_string(data, cubin.mangled);
  put_string(data, cubin.code);
  auto tmp = file;
  tmp += ".tmp" + std::to_string(getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f || !f.write(data.data(), static_cast<std::streamsize>(data.size()))) {
      f.close();
      std::filesystem::remove(tmp, ec);
      return;
    }
  }
  std::filesystem::rename(tmp, file, ec);
  if (ec) std::filesystem::remove(tmp, ec);
}

// Every layer of a model has the same layout, hence the same source: one compilation (about 2 s
// of NVRTC for qwen3-0.6b's layout on an H200) serves them all, and the disk copy serves later
// processes. Keyed by everything the machine code depends on; modules stay loaded for the life
// of the process, as MLX keeps its own JIT modules.
struct ModuleCache {
  std::mutex lock;
  std::unordered_map<std::string, std::shared_ptr<const CompiledModule>> modules;
  size_t compilations = 0;
  size_t disk_loads = 0;
};

ModuleCache& module_cache() {
  static ModuleCache* cache = new ModuleCache();  // never destroyed: modules outlive exit order
  return *cache;
}

std::string module_key(const std::string& source, const std::string& kernel_name, int major,
                       int minor) {
  int nvrtc_major = 0, nvrtc_minor = 0;
  nvrtcVersion(&nvrtc_major, &nvrtc_minor);
  std::string key = "sm_" + std::to_string(major) + std::to_string(minor) + " nvrtc " +
                    std::to_string(nvrtc_major) + "." + std::to_string(nvrtc_minor) + " " +
                    cuda_include() + " " + cccl_dir();
  for (const auto* part : {&kernel_name, &source}) {
    key += '\0';
    key += *part;
  }
  return key;
}

std::shared_ptr<const CompiledModule> compile(const std::string& source,
                                              const std::string& file_name,
                                              const std::string& kernel_name, int major,
                                              int minor) {
  std::string key = module_key(source, kernel_name, major, minor);
  auto& cache = module_cache();
  std::lock_guard<std::mutex> guard(cache.lock);
  auto& slot = cache.modules[key];
  if (slot) return slot;
  auto file = disk_file(key);
  Cubin cubin;
  if (read_disk(file, key, cubin)) {
    try {
      slot = std::make_shared<const CompiledModule>(load_module(cubin));
      ++cache.disk_loads;
      return slot;
    } catch (const std::runtime_error&) {
      // Machine code the driver refuses (another driver, a damaged file): compile again.
    }
  }
  cubin = nvrtc_compile(source, file_name, kernel_name, major, minor);
  slot = std::make_shared<const CompiledModule>(load_module(cubin));
  ++cache.compilations;
  write_disk(file, key, cubin);
  return slot;
}

// Fills 16-bit outputs with one bit pattern (NaN) before the kernel: tests use it to catch
// elements the kernel never writes.
const char* kFillSource = R"(
extern "C" __global__ void fusedqk_fill_u16(unsigned short* p, unsigned long long n,
                                            unsigned short v) {
  unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (i < n) p[i] = v;
}
)";

// The flags and data size MLX's Slice gives a view of ``base`` with ``shape`` starting at its
// first element (mlx/backend/common/slicing.cpp), so attention reads this view exactly as it
// reads the slice mlx-lm's KVCache returns.
void share_as_view(const mx::array& base, mx::array& view) {
  const auto& strides = base.strides();
  int64_t end = 1;
  for (int i = 0; i < static_cast<int>(base.ndim()); ++i) {
    if (base.shape(i) > 1) end += static_cast<int64_t>(view.shape(i) - 1) * strides[i];
  }
  auto [no_broadcast_size, row_contiguous, col_contiguous] =
      mx::check_contiguity(view.shape(), strides);
  auto flags = base.flags();
  flags.row_contiguous = row_contiguous;
  flags.col_contiguous = col_contiguous;
  flags.contiguous = no_broadcast_size == static_cast<size_t>(end);
  view.copy_shared_buffer(base, strides, flags, static_cast<size_t>(end), 0);
}

// Registers the kernel's inputs as the next node's dependencies; each must be row-contiguous,
// since the kernel indexes every input densely.
void add_inputs(mx::cu::CommandEncoder& encoder, const std::vector<mx::array>& inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].flags().row_contiguous) {
      throw std::invalid_argument("fusedqk primitive: input " + std::to_string(i) +
                                  " is not row-contiguous");
    }
    encoder.set_input_array(inputs[i]);
  }
}

// Everything about one kernel that does not change from call to call.
struct KernelSpec {
  std::string kernel_name;  // NVRTC name expression, e.g. mlx::core::cu::fusedqk_...
  std::string source;
  int blocks_x;
  int threads;
  int max_batch;
  std::vector<mx::Shape> output_tails;  // output shapes after the leading batch dimension
  mx::Dtype dtype;
  bool poison;
  // The kernel writes k and v into the KV cache buffers it is given (its last two inputs) and
  // returns q, the projection scratch and views of the buffers' first positions.
  bool writes_cache;
  std::once_flag compiled;
  std::shared_ptr<const CompiledModule> module;
  std::shared_ptr<const CompiledModule> fill;

  KernelSpec(std::string name, std::string src, int bx, int t, int mb,
             std::vector<mx::Shape> tails, mx::Dtype dt, bool p, bool wc)
      : kernel_name(std::move(name)), source(std::move(src)), blocks_x(bx), threads(t),
        max_batch(mb), output_tails(std::move(tails)), dtype(dt), poison(p), writes_cache(wc) {}

  void ensure_compiled(mx::cu::Device& device) {
    std::call_once(compiled, [&] {
      int major = device.compute_capability_major(), minor = device.compute_capability_minor();
      module = compile(source, "fusedqk_kernel.cu", kernel_name, major, minor);
      if (poison) fill = compile(kFillSource, "fusedqk_fill.cu", "fusedqk_fill_u16", major, minor);
    });
  }
};

class KernelPrimitive : public mx::Primitive {
 public:
  KernelPrimitive(mx::Stream stream, std::shared_ptr<KernelSpec> spec)
      : mx::Primitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("fusedqk primitive: runs on the CUDA GPU only");
  }

  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& s = stream();
    auto& device = mx::cu::device(s.device);
    device.make_current();
    spec_->ensure_compiled(device);
    auto& encoder = mx::cu::get_command_encoder(s);
    if (spec_->writes_cache) {
      eval_writing_cache(encoder, inputs, outputs);
      return;
    }
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    std::vector<void*> pointers;
    pointers.reserve(inputs.size() + outputs.size());
    for (auto& in : inputs) pointers.push_back(mx::gpu_ptr<void>(in));
    for (auto& out : outputs) pointers.push_back(mx::gpu_ptr<void>(out));
    // The encoder gives each node the arrays registered since the previous node as its
    // dependencies: register per node, and make the kernel depend on the fills before it.
    if (spec_->poison) {
      unsigned short nan_bits = spec_->dtype == mx::bfloat16 ? 0x7FC0 : 0x7E00;
      for (size_t i = inputs.size(); i < pointers.size(); ++i) {
        unsigned long long n = outputs[i - inputs.size()].size();
        void* args[] = {&pointers[i], &n, &nan_bits};
        encoder.set_output_array(outputs[i - inputs.size()]);
        encoder.add_kernel_node_raw(spec_->fill->function,
                                    dim3(static_cast<unsigned>((n + 255) / 256)), dim3(256),
                                    dim3(), 0, args);
      }
    }
    add_inputs(encoder, inputs);
    for (auto& out : outputs) {
      if (spec_->poison) encoder.set_input_array(out);
      encoder.set_output_array(out);
    }
    std::vector<void*> args;
    args.reserve(pointers.size());
    for (auto& p : pointers) args.push_back(&p);
    const int batch = inputs[0].shape(0);
    encoder.add_kernel_node_raw(spec_->module->function, dim3(spec_->blocks_x, batch, 1),
                                dim3(spec_->threads, 1, 1), dim3(), 0, args.data());
  }

  const char* name() const override {
    return spec_->writes_cache ? "FusedQKCacheKernel" : "FusedQKKernel";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return spec_ == static_cast<const KernelPrimitive&>(other).spec_;
  }

 private:
  // Inputs: the kernel's own, then the cache's key and value buffers (B, KV, S, D), which the
  // kernel writes at each sequence's position. Outputs: q, the projection scratch, and views of
  // the buffers' first L positions (what attention reads), sharing the buffers as MLX's Slice
  // shares its input. The write is in place: the caller owns the buffers, and a KV cache only
  // appends, so no earlier view of them covers the position written (fusedqk/attention.py).
  void eval_writing_cache(mx::cu::CommandEncoder& encoder, const std::vector<mx::array>& inputs,
                          std::vector<mx::array>& outputs) {
    const size_t own = inputs.size() - 2;
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
    share_as_view(inputs[own], outputs[2]);
    share_as_view(inputs[own + 1], outputs[3]);
    std::vector<void*> pointers;
    add_inputs(encoder, inputs);
    // The kernel's parameters: its inputs, then q, k (the key buffer), v (the value buffer),
    // the scratch, then the buffers' length and the position written (the views' last).
    for (size_t i = 0; i < own; ++i) pointers.push_back(mx::gpu_ptr<void>(inputs[i]));
    pointers.push_back(mx::gpu_ptr<void>(outputs[0]));
    pointers.push_back(mx::gpu_ptr<void>(inputs[own]));
    pointers.push_back(mx::gpu_ptr<void>(inputs[own + 1]));
    pointers.push_back(mx::gpu_ptr<void>(outputs[1]));
    for (auto& out : outputs) encoder.set_output_array(out);
    int cache_len = inputs[own].shape(2);
    int cache_slot = outputs[2].shape(2) - 1;
    std::vector<void*> args;
    for (auto& p : pointers) args.push_back(&p);
    args.push_back(&cache_len);
    args.push_back(&cache_slot);
    const int batch = inputs[0].shape(0);
    encoder.add_kernel_node_raw(spec_->module->function, dim3(spec_->blocks_x, batch, 1),
                                dim3(spec_->threads, 1, 1), dim3(), 0, args.data());
  }

  std::shared_ptr<KernelSpec> spec_;
};

mx::Dtype dtype_from_name(const std::string& name) {
  if (name == "bfloat16") return mx::bfloat16;
  if (name == "float16") return mx::float16;
  throw std::invalid_argument("fusedqk primitive: dtype " + name +
                              " is not accepted; use bfloat16 or float16");
}

// The Python-facing handle: built once per layer, called once per layer per step.
class Kernel {
 public:
  Kernel(std::string kernel_name, std::string source, int blocks_x, int threads, int max_batch,
         std::vector<std::vector<int>> output_tails, const std::string& dtype, bool poison,
         bool writes_cache) {
    if (poison && writes_cache) {
      throw std::invalid_argument("fusedqk primitive: a cache-writing kernel is not poisoned");
    }
    std::vector<mx::Shape> tails;
    for (auto& t : output_tails) tails.emplace_back(t.begin(), t.end());
    spec_ = std::make_shared<KernelSpec>(std::move(kernel_name), std::move(source), blocks_x,
                                         threads, max_batch, std::move(tails),
                                         dtype_from_name(dtype), poison, writes_cache);
  }

  std::vector<mx::array> operator()(const std::vector<mx::array>& inputs) const {
    if (spec_->writes_cache) {
      throw std::invalid_argument("fusedqk primitive: this kernel writes a cache; call with_cache");
    }
    const int batch = checked_batch(inputs);
    std::vector<mx::Shape> shapes;
    for (size_t i = 0; i < spec_->output_tails.size(); ++i) shapes.push_back(tail_shape(batch, i));
    std::vector<mx::Dtype> dtypes(shapes.size(), spec_->dtype);
    auto stream = mx::default_stream(mx::Device::gpu);
    return mx::array::make_arrays(std::move(shapes), dtypes,
                                  std::make_shared<KernelPrimitive>(stream, spec_), inputs);
  }

  // q (B, H, 1, D) and the views of the first ``length`` positions of the key and value
  // buffers (B, KV, S, D) after this step's k and v are written into them; inputs = the
  // kernel's own + the two buffers, 1 <= length <= S.
  std::vector<mx::array> with_cache(const std::vector<mx::array>& inputs, int length) const {
    if (!spec_->writes_cache) {
      throw std::invalid_argument("fusedqk primitive: this kernel writes no cache");
    }
    const int batch = checked_batch(inputs);
    const auto& keys = inputs[inputs.size() - 2];
    const auto& values = inputs[inputs.size() - 1];
    const auto& kv_tail = spec_->output_tails[1];
    for (const auto* c : {&keys, &values}) {
      if (c->ndim() != 4 || c->shape(0) != batch || c->shape(1) != kv_tail[0] ||
          c->shape(3) != kv_tail[2] || c->dtype() != spec_->dtype) {
        throw std::invalid_argument("fusedqk primitive: the KV cache must be (batch, kv heads, "
                                    "positions, head dim) in the activation dtype");
      }
    }
    if (values.shape(2) != keys.shape(2) || length < 1 || length > keys.shape(2)) {
      throw std::invalid_argument("fusedqk primitive: view length " + std::to_string(length) +
                                  " is outside 1.." + std::to_string(keys.shape(2)));
    }
    mx::Shape view{batch, keys.shape(1), length, keys.shape(3)};
    std::vector<mx::Shape> shapes{tail_shape(batch, 0), tail_shape(batch, 3), view, view};
    std::vector<mx::Dtype> dtypes(shapes.size(), spec_->dtype);
    auto stream = mx::default_stream(mx::Device::gpu);
    auto outs = mx::array::make_arrays(std::move(shapes), dtypes,
                                       std::make_shared<KernelPrimitive>(stream, spec_), inputs);
    return {outs[0], outs[2], outs[3]};
  }

  // Bytes of machine code compiled (0 until the kernel first ran).
  size_t cubin_bytes() const {
    return spec_->module ? spec_->module->cubin_bytes : 0;
  }

 private:
  int checked_batch(const std::vector<mx::array>& inputs) const {
    if (inputs.empty() || inputs[0].ndim() == 0) {
      throw std::invalid_argument("fusedqk primitive: the first input must have a batch axis");
    }
    const int batch = inputs[0].shape(0);
    if (batch < 1 || batch > spec_->max_batch) {
      throw std::invalid_argument("fusedqk primitive: batch " + std::to_string(batch) +
                                  " is outside 1.." + std::to_string(spec_->max_batch));
    }
    return batch;
  }

  mx::Shape tail_shape(int batch, size_t output) const {
    mx::Shape shape{batch};
    const auto& tail = spec_->output_tails[output];
    shape.insert(shape.end(), tail.begin(), tail.end());
    return shape;
  }

  std::shared_ptr<KernelSpec> spec_;
};

}  // namespace fusedqk

NB_MODULE(_fusedqk_cuda, m) {
  m.doc() = "fusedqk's fused decode kernel as an MLX primitive on CUDA (optional build)";
  nb::class_<fusedqk::Kernel>(m, "Kernel")
      .def(nb::init<std::string, std::string, int, int, int, std::vector<std::vector<int>>,
                    const std::string&, bool, bool>(),
           nb::arg("kernel_name"), nb::arg("source"), nb::arg("blocks_x"), nb::arg("threads"),
           nb::arg("max_batch"), nb::arg("output_tails"), nb::arg("dtype"),
           nb::arg("poison") = false, nb::arg("writes_cache") = false)
      .def("__call__", &fusedqk::Kernel::operator(), nb::arg("inputs"))
      .def("with_cache", &fusedqk::Kernel::with_cache, nb::arg("inputs"), nb::arg("length"))
      .def_prop_ro("cubin_bytes", &fusedqk::Kernel::cubin_bytes);
  m.def("compilations", [] {
    auto& cache = fusedqk::module_cache();
    std::lock_guard<std::mutex> guard(cache.lock);
    return cache.compilations;
  }, "How many kernels NVRTC compiled in this process (each distinct source once).");
  m.def("disk_loads", [] {
    auto& cache = fusedqk::module_cache();
    std::lock_guard<std::mutex> guard(cache.lock);
    return cache.disk_loads;
  }, "How many kernels this process loaded from the on-disk copy instead of compiling them.");
  // Proves at load time that this module and mlx.core share nanobind's type registry: if their
  // nanobind ABIs differed, an mlx.core.array would not convert here.
  m.def("array_ndim", [](const mx::array& a) { return a.ndim(); }, nb::arg("array"));
}
