// The CUDA implementations of the fastelbo:: ops (schemas in fastelbo/_ops.py):
// the ops of torch_ops.h (the shape rules of ../checks.h, as the CPU kernels,
// then the raw-pointer launchers of csrc/cuda/*.cu) on CUDA tensors,
// launched on the current stream of the inputs' device. Only this file and
// torch_ops.h see torch; csrc/emu/binding.cpp registers the same ops on the
// CUDA emulation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "torch_ops.h"

namespace fastelbo {
namespace cuda {
namespace {

struct CudaDevice {
  // All tensor arguments on the first one's CUDA device (the dispatcher only
  // guarantees that one of them is a CUDA tensor).
  static void check(const at::Tensor& first, const char* first_name, cuda_ops::Others others) {
    TORCH_CHECK(first.is_cuda(), "fastelbo: ", first_name, " must be a CUDA tensor for the CUDA kernels, got ",
                first.device());
    for (const auto& [t, name] : others) {
      if (t->has_value()) {
        TORCH_CHECK((*t)->device() == first.device(), "fastelbo: ", name, " must be on ", first.device(), " like ",
                    first_name, ", got ", (*t)->device());
      }
    }
  }

  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static int num_sms(const at::Tensor& like) {
    static std::array<int, 64> cache{};  // 0: not asked yet
    const int index = like.device().index();
    if (index >= 0 && index < static_cast<int>(cache.size()) && cache[index] > 0) return cache[index];
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, index));
    if (index >= 0 && index < static_cast<int>(cache.size())) cache[index] = n;
    return n;
  }

  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

  // The seed of the noise: one int64 on the device, read by the kernels (no host sync).
  static const int64_t* seed_ptr(const at::Tensor& seed, const at::Tensor& like, at::Tensor& holder) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
                "fastelbo: seed must be a one-element int64 tensor");
    holder = seed.device() == like.device() ? seed : seed.to(like.device());
    return holder.const_data_ptr<int64_t>();
  }

  static void launched() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

  // x outside [0, 1] (validate_x): a device-side assert after the forward, never a host read.
  static void check_x_flag(const at::Tensor& flag) {
    if (!flag.defined()) return;
    assert_x_in_unit_interval(flag.const_data_ptr<int>(), stream());
    launched();
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastelbo, CUDA, m) { cuda_ops::register_ops<CudaDevice>(m, ""); }

}  // namespace cuda
}  // namespace fastelbo
