"""fastelbo's Triton kernels (shipped as fastelbo.kernels): one module per op family,

    rsample.py   reparameterized sample, Philox noise regenerated in the backward
    kl.py        Gaussian KL to N(0, I) or a diagonal Gaussian prior
    loglik.py    Bernoulli and Gaussian log-likelihood
    elbo.py      the fused ELBO: log-likelihood over Dx and KL over Dz, one launch each way
                 (recon [B, Dx] or K samples [K, B, Dx])
    iwae.py      the importance-weighted bound: log-weights [K, B] and their log-sum-exp
    free_bits.py KL with free bits: per-dimension batch means, then the floored rows
    _launch.py   host side: tile sizes, autotuning, launches, the launchers' operand helpers
    _checks.py   host side: the ops' argument checks (the Triton twin of csrc/checks.h)
    _tiles.py    @triton.jit loads and stores of [ROWS, BLOCK] tiles
    _math.py     @triton.jit per-element math and noise (the Triton twin of csrc/fastelbo_math.h)

each registered as ``fastelbo::triton_<op>`` / ``fastelbo::triton_<op>_backward``
with torch.library.triton_op (torch.compile traces into them), the autograd
of fastelbo._ops and the autocast rule of fastelbo._autocast. ``OPS`` holds them under the names and call signatures of
torch.ops.fastelbo, for fastelbo._backend.impl("triton").

On CPU tensors the kernels run under the Triton interpreter, which must be on
(TRITON_INTERPRET=1) before this package is imported.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from fastelbo import _autocast, _onepass, _ops, _vmap

from . import _launch, elbo, free_bits, iwae, kl, loglik, rsample  # noqa: F401  (defines and registers the ops)

INTERPRET = _launch.INTERPRET

for _family in _ops.FAMILIES:
    _ops.register_autograd(f"fastelbo::triton_{_family}", _family,
                           getattr(torch.ops.fastelbo, f"triton_{_family}_backward"))
    _ops.refuse_double_backward(f"fastelbo::triton_{_family}_backward")
    _autocast.register(f"fastelbo::triton_{_family}")  # float32 inside torch.autocast, as the C++ ops
_vmap.register("triton_")  # torch.vmap: the batched dimension onto the rows (fastelbo/_vmap.py)

# The op namespace of the "triton" backend: same names and signatures as torch.ops.fastelbo.
OPS = SimpleNamespace(**{
    name: getattr(torch.ops.fastelbo, f"triton_{name}")
    for family in _ops.FAMILIES for name in (family, family + "_backward")
})

# The one-pass reduced loss of ELBOLoss (fastelbo/_onepass.py): fastelbo::triton_elbo_loss.
_LIB = torch.library.Library("fastelbo", "FRAGMENT")
_onepass.define_twin("triton_", OPS, _LIB)

# Every @triton.jit kernel (for build checks): name -> JITFunction.
KERNELS = {
    "rsample_fwd": rsample._rsample_fwd_kernel,
    "rsample_bwd": rsample._rsample_bwd_kernel,
    "kl_fwd": kl._kl_fwd_kernel,
    "kl_bwd": kl._kl_bwd_kernel,
    "loglik_fwd": loglik._loglik_fwd_kernel,
    "loglik_bwd": loglik._loglik_bwd_kernel,
    "elbo_fwd": elbo._elbo_fwd_kernel,
    "elbo_bwd": elbo._elbo_bwd_kernel,
    "iwae_fwd": iwae._iwae_fwd_kernel,
    "iwae_bwd": iwae._iwae_bwd_kernel,
    "free_bits_cols": free_bits._free_bits_cols_kernel,
    "free_bits_fwd": free_bits._free_bits_fwd_kernel,
    "free_bits_bwd": free_bits._free_bits_bwd_kernel,
}
