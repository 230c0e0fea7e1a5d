// TEST-ONLY: the CUDA kernels of csrc/cuda, compiled as host C++ against the
// CUDA emulation (cuda_emu.h), as the fastelbo::emu_<op> ops on CPU tensors:
// the "cuda-emulated" backend of the test suite (fastelbo/_emulated.py defines
// the ops; fastelbo/_build.py builds this extension only when asked).
//
// The very ops of csrc/cuda/binding.cpp (../cuda/torch_ops.h: the shape rules of
// ../checks.h, as the CPU ops, then the raw-pointer launchers of
// csrc/cuda/launchers.h) with a device policy for CPU memory: "device memory"
// is host memory, the stream is null (emulated launches are synchronous) and
// the multiprocessor count is FASTELBO_EMU_SMS (default 1, geometry.cpp):
// small, so the launch geometry of large inputs (grid-stride loops, rows cut
// into slices, blocks reusing their shared memory for several rows) shows at
// test sizes.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "../cuda/torch_ops.h"

extern "C" int fastelbo_emu_sms();  // geometry.cpp

namespace fastelbo {
namespace emu {
namespace {

struct EmuDevice {
  static void check(const at::Tensor& first, const char* first_name, cuda_ops::Others others) {
    TORCH_CHECK(first.device().is_cpu(), "fastelbo: ", first_name,
                " must be a CPU tensor for the emulated CUDA kernels, got ", first.device());
    for (const auto& [t, name] : others) {
      if (t->has_value()) {
        TORCH_CHECK((*t)->device().is_cpu(), "fastelbo: ", name, " must be a CPU tensor like ", first_name, ", got ",
                    (*t)->device());
      }
    }
  }

  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static int num_sms(const at::Tensor&) { return fastelbo_emu_sms(); }

  static cudaStream_t stream() { return nullptr; }

  static const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor&, at::Tensor&) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                "fastelbo: seed must be a one-element int64 tensor");
    TORCH_CHECK(seed.device().is_cpu(), "fastelbo: seed must be a CPU tensor, got ", seed.device());
    return seed.const_data_ptr<int64_t>();
  }

  static void launched() {}

  // x outside [0, 1] (validate_x): the flag is host memory and the launch has
  // completed, so it is read at once (a ValueError, as the CPU kernels raise);
  // csrc/cuda/binding.cpp queues a device-side assert instead.
  static void check_x_flag(const at::Tensor& flag) {
    if (flag.defined()) check_x_in_unit_interval(flag.const_data_ptr<int>()[0] != 0);
  }
};

}  // namespace

// The ops are defined in Python (fastelbo/_emulated.py), with the schemas of
// their fastelbo::<op> twins, before this library is loaded.
TORCH_LIBRARY_IMPL(fastelbo, CPU, m) { cuda_ops::register_ops<EmuDevice>(m, "emu_"); }

}  // namespace emu
}  // namespace fastelbo
