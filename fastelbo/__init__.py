"""fastelbo: fused, exact ELBO losses for PyTorch.

    import fastelbo
    z = fastelbo.rsample(mu, logvar)                        # reparameterized sample
    loss = fastelbo.ELBOLoss()(recon_logits, x, mu, logvar)  # negative ELBO, fused

See fastelbo.functional for the functions, fastelbo.reference for the
torch.distributions ground truth every backend is tested against.
"""

from . import _ops  # noqa: F401  (registers the fastelbo:: ops)
from . import _autocast  # noqa: F401  (their torch.autocast rules: float32, see docs/training.md)
from . import _vmap  # noqa: F401  (their torch.vmap rules, see docs/training.md)
from . import diagnostics, reference
from ._argorder import ArgumentOrderWarning
from ._backend import FallbackWarning
from ._build import BuildError, load_kernels
from ._validate import set_default_validate_args
from .evaluation import estimate_log_likelihood
from .functional import (ELBOTerms, bernoulli_log_prob, elbo, free_bits_kl, gaussian_kl, gaussian_log_prob,
                         iwae_bound, rsample)
from ._logits_check import LogitsWarning
from .loss import ELBOLoss
from .posterior import DiagonalGaussian

__version__ = "0.2.0"

__all__ = [
    "rsample",
    "gaussian_kl",
    "bernoulli_log_prob",
    "gaussian_log_prob",
    "elbo",
    "iwae_bound",
    "free_bits_kl",
    "estimate_log_likelihood",
    "ELBOTerms",
    "ELBOLoss",
    "DiagonalGaussian",
    "FallbackWarning",
    "ArgumentOrderWarning",
    "LogitsWarning",
    "BuildError",
    "load_kernels",
    "set_default_validate_args",
    "reference",
    "diagnostics",
    "__version__",
]
