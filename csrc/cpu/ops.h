// ops.h: what every CPU op (the *_cpu functions of this directory, registered
// for the CPU dispatch key at the end of each family's file) starts from: the
// shape rules shared by the C++ backends (../checks.h), the device check of the
// CPU kernels, and their allocator of large results (output_cache.h, the CPU's
// own: no other backend uses it).
#pragma once

#include <ATen/ATen.h>

#include "../checks.h"
#include "output_cache.h"

namespace fastelbo {
namespace cpu {

// The CPU kernels read their operands on the host; the other operands are checked against this one.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastelbo: ", name, " must be on cpu for the CPU kernels, got ", t.device());
}

}  // namespace cpu
}  // namespace fastelbo
