// flywheel-edge-run: run an ExecuTorch program (.pte) on .npy inputs.
//
//   flywheel-edge-run <model.pte> <out_dir> <input0.npy> [input1.npy ...] [--repeat N]
//
// Loads the program with ExecuTorch's C++ Module API, runs `forward` once and
// writes output i to <out_dir>/output_<i>.npy (float outputs as float32, int64
// outputs as int64). With --repeat N it then runs N more times and prints
// "median_us=<median latency in microseconds> repeat=<N>" on stdout; each
// timed run includes copying the inputs into the method, as a server would.
//
// Exit status: 0 on success, 2 for bad usage or a bad input file, 1 when the
// runtime refuses the program or the inputs. Messages go to stderr, prefixed
// "flywheel-edge-run: error:".
//
// Kernels and delegates (XNNPACK) register themselves from static
// initializers of their shared libraries; the build keeps those libraries
// linked (see CMakeLists.txt), and --list-backends shows what registered.

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <sys/stat.h>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/platform/runtime.h>

#include "npy.h"

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::Error;
using executorch::runtime::EValue;

constexpr const char* kUsage =
    "usage: flywheel-edge-run <model.pte> <out_dir> <input0.npy> [input1.npy ...] [--repeat N]\n"
    "       flywheel-edge-run --list-backends\n";

int fail(int status, const std::string& message) {
  std::fprintf(stderr, "flywheel-edge-run: error: %s\n", message.c_str());
  return status;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

template <typename Span>
std::string span_text(const Span& sizes) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  return shape_text(v);
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

struct Args {
  std::string model;
  std::string out_dir;
  std::vector<std::string> inputs;
  long repeat = 0;
  bool list_backends = false;
};

// Returns an empty string on success, else the usage problem.
std::string parse_args(int argc, char** argv, Args& args) {
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--repeat") {
      if (i + 1 >= argc) return "--repeat needs a value";
      const std::string v = argv[++i];
      char* end = nullptr;
      errno = 0;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || errno != 0 || n < 1 || n > 100000000)
        return "--repeat must be a positive integer, got '" + v + "'";
      args.repeat = n;
    } else if (a == "--list-backends") {
      args.list_backends = true;
    } else if (a == "-h" || a == "--help") {
      return "help";
    } else if (a.size() > 1 && a[0] == '-' && a[1] == '-') {
      return "unknown option '" + a + "'";
    } else {
      positional.push_back(a);
    }
  }
  if (args.list_backends && positional.empty()) return "";
  if (positional.size() < 3) return "expected a model, an output folder and at least one input";
  args.model = positional[0];
  args.out_dir = positional[1];
  args.inputs.assign(positional.begin() + 2, positional.end());
  return "";
}

void print_backends(std::FILE* to) {
  const std::size_t n = executorch::runtime::get_num_registered_backends();
  std::fprintf(to, "registered backends (%zu):", n);
  for (std::size_t i = 0; i < n; ++i) {
    auto name = executorch::runtime::get_backend_name(i);
    std::fprintf(to, " %s", name.ok() ? *name : "?");
  }
  std::fprintf(to, "\n");
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  const std::string problem = parse_args(argc, argv, args);
  if (problem == "help") {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (!problem.empty()) {
    std::fputs(kUsage, stderr);
    return fail(2, problem);
  }
  executorch::runtime::runtime_init();
  if (args.list_backends) {
    print_backends(stdout);
    if (args.model.empty()) return 0;
  }
  if (!is_directory(args.out_dir))
    return fail(2, "output folder '" + args.out_dir + "' does not exist");

  // Read every input before touching the program, so a bad file is reported
  // as such and not as a runtime failure.
  std::vector<flywheel::npy::Array> arrays;
  arrays.reserve(args.inputs.size());
  for (const auto& path : args.inputs) {
    try {
      arrays.push_back(flywheel::npy::load(path));
    } catch (const flywheel::npy::Error& e) {
      return fail(2, std::string("bad input file ") + e.what());
    }
  }

  Module module(args.model, Module::LoadMode::Mmap);
  Error err = module.load();
  if (err != Error::Ok)
    return fail(1, "cannot load program '" + args.model + "': " + executorch::runtime::to_string(err));
  auto meta = module.method_meta("forward");
  if (!meta.ok())
    return fail(1, "program '" + args.model + "' has no loadable 'forward' method: " +
                       executorch::runtime::to_string(meta.error()));
  for (std::size_t b = 0; b < meta->num_backends(); ++b) {
    auto name = meta->get_backend_name(b);
    if (name.ok() && executorch::runtime::get_backend_class(*name) == nullptr) {
      print_backends(stderr);
      return fail(1, std::string("the program needs backend '") + *name +
                         "', which is not registered in this binary (was it linked with "
                         "--no-as-needed?)");
    }
  }
  err = module.load_method("forward");
  if (err != Error::Ok)
    return fail(1, std::string("cannot load method 'forward': ") + executorch::runtime::to_string(err));

  if (meta->num_inputs() != arrays.size())
    return fail(2, "the program takes " + std::to_string(meta->num_inputs()) + " input(s), got " +
                       std::to_string(arrays.size()));
  std::vector<TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (std::size_t i = 0; i < arrays.size(); ++i) {
    auto& arr = arrays[i];
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) return fail(1, "input " + std::to_string(i) + " is not a tensor input");
    const ScalarType want = info->scalar_type();
    const ScalarType got =
        arr.dtype == flywheel::npy::DType::Float32 ? ScalarType::Float : ScalarType::Long;
    if (want != got)
      return fail(2, "input " + std::to_string(i) + " (" + args.inputs[i] + "): the program wants " +
                         executorch::runtime::toString(want) + ", the file holds " +
                         flywheel::npy::descr(arr.dtype));
    // The program records each input's upper-bound sizes; a bigger dim would
    // be refused by the runtime with only an error number.
    const auto bound = info->sizes();
    bool fits = bound.size() == arr.shape.size();
    for (std::size_t d = 0; fits && d < bound.size(); ++d) fits = arr.shape[d] <= bound[d];
    if (!fits)
      return fail(2, "input " + std::to_string(i) + " (" + args.inputs[i] + "): shape " +
                         shape_text(arr.shape) + " does not fit the program's input, at most " +
                         span_text(bound));
    std::vector<executorch::aten::SizesType> sizes(arr.shape.begin(), arr.shape.end());
    tensors.push_back(executorch::extension::from_blob(arr.data.data(), sizes, got));
    inputs.emplace_back(tensors.back());
  }

  auto result = module.forward(inputs);
  if (!result.ok())
    return fail(1, std::string("forward failed: ") + executorch::runtime::to_string(result.error()));

  for (std::size_t i = 0; i < result->size(); ++i) {
    const EValue& value = (*result)[i];
    const std::string path = args.out_dir + "/output_" + std::to_string(i) + ".npy";
    if (!value.isTensor()) return fail(1, "output " + std::to_string(i) + " is not a tensor");
    const auto& t = value.toTensor();
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    flywheel::npy::DType dtype;
    if (t.scalar_type() == ScalarType::Float)
      dtype = flywheel::npy::DType::Float32;
    else if (t.scalar_type() == ScalarType::Long)
      dtype = flywheel::npy::DType::Int64;
    else
      return fail(1, "output " + std::to_string(i) + " has dtype " +
                         executorch::runtime::toString(t.scalar_type()) +
                         "; only float32 and int64 outputs can be written");
    try {
      flywheel::npy::save(path, dtype, shape, t.const_data_ptr(), t.nbytes());
    } catch (const flywheel::npy::Error& e) {
      return fail(1, e.what());
    }
  }

  if (args.repeat > 0) {
    std::vector<double> micros;
    micros.reserve(static_cast<std::size_t>(args.repeat));
    for (long r = 0; r < args.repeat; ++r) {
      const auto start = std::chrono::steady_clock::now();
      auto out = module.forward(inputs);
      const auto stop = std::chrono::steady_clock::now();
      if (!out.ok())
        return fail(1, std::string("forward failed on repeat ") + std::to_string(r) + ": " +
                           executorch::runtime::to_string(out.error()));
      micros.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    }
    std::sort(micros.begin(), micros.end());
    const std::size_t n = micros.size();
    const double median = n % 2 ? micros[n / 2] : 0.5 * (micros[n / 2 - 1] + micros[n / 2]);
    std::printf("median_us=%.2f repeat=%ld\n", median, args.repeat);
  }
  return 0;
}
