"""jsoftmax: accurate, fast and verifiable softmax, log-softmax and cross-entropy for JAX."""

from ._fused import fused_cross_entropy as fused_cross_entropy
from ._labels import check_labels as check_labels
from ._linear import linear_cross_entropy as linear_cross_entropy
from ._losses import cross_entropy as cross_entropy
from ._normalizers import log_softmax as log_softmax
from ._normalizers import logsumexp as logsumexp
from ._normalizers import softmax as softmax
from ._normalizers import softmax_jacobian as softmax_jacobian
from ._optax_losses import softmax_cross_entropy as softmax_cross_entropy
from ._optax_losses import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)

# isort: split
from . import testing as testing  # after the functions it checks

__version__ = "0.2.0"

__all__ = [
    "check_labels",
    "cross_entropy",
    "fused_cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_jacobian",
    "testing",
]
