"""Tools to verify derivatives: :func:`check_vjp` compares a hand-written VJP with
independent derivations (reverse mode, forward mode, finite differences) of a reference."""

from ._check_vjp import check_vjp as check_vjp
from ._check_vjp import default_tolerance as default_tolerance

__all__ = ["check_vjp", "default_tolerance"]
