"""torch.autocast rules of the ``fastelbo::`` ops.

POLICY (docs/training.md, "autocast"): inside ``torch.autocast`` (CPU or
CUDA, float16 or bfloat16) every forward op of fastelbo runs on float32
inputs and returns float32 results, as PyTorch's own losses do
(binary_cross_entropy_with_logits, mse_loss, kl_div, nll_loss are on
autocast's float32 list):

- the autocast kernel casts each float16/bfloat16/float32 tensor input to
  float32 (float64 and integer tensors, e.g. the seed, are left alone) and
  calls the op with autocast off; the cast is an ordinary differentiable
  ``.to``, so gradients come back to bfloat16/float16 inputs in their dtype;
- ``rsample`` follows the same rule (z is float32; the decoder's next Linear
  casts it back to the autocast dtype), so every op has one rule;
- the public API, which refuses mixed dtypes outside autocast, accepts a mix
  of float16/bfloat16/float32 inside an autocast region of the tensors'
  device type (fastelbo._validate.same_kind): under autocast a Linear returns
  bfloat16 recon while the data x stays float32, and the op's cast makes
  them one dtype. float64 never mixes.

The backward ops need no rule: they see the float32 inputs saved by the
forward and a float32 upstream gradient (autograd casts a gradient to its
output's dtype). The kernels read float32 here; the bfloat16-reading fast
path is what runs outside autocast on tensors of one dtype.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (the ops must be defined first)
from ._dtypes import AUTOCAST_DTYPES  # noqa: F401  (the policy's dtypes)

#: The forward ops that take floating-point tensors (philox_noise takes only the seed).
FORWARD_OPS = _ops.FAMILIES


DEVICE_TYPES = tuple(d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d))

def register(op: str) -> None:
    """The float32 autocast rule for forward op `op` ("fastelbo::<name>"), on CPU and CUDA.

    One Python kernel per AutocastCPU/AutocastCUDA key (torch.library's public
    API; torch.compile and torch.export see it too). Every backend's forward
    ops need it: the C++ ops below, and fastelbo.kernels' fastelbo::triton_<op>
    ops where they are registered.
    """
    for device_type in DEVICE_TYPES:
        torch.library.register_autocast(op, device_type, torch.float32)


for _name in FORWARD_OPS:
    register(f"fastelbo::{_name}")
