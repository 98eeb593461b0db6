"""Which program a function carries: the CPU-tuned one or the portable one.

Each op has a *portable* formulation, the plain statement of its math that XLA's GPU and TPU
compilers fuse well, and some have a *CPU* formulation tuned for XLA:CPU, whose fusion rules
differ (see :mod:`jsoftmax._numerics`). :func:`by_platform` stages both out with
:func:`jax.lax.platform_dependent`, so the choice is made when the program is lowered: a
program lowered or exported for ``cuda``, ``rocm`` or ``tpu`` contains the portable code only,
and one lowered for ``cpu`` the tuned code only.

Use it inside a ``custom_jvp`` primal or a ``custom_vjp`` rule, never in code that autodiff
traces through: the partial evaluation of a conditional saves the residuals of every branch.

:func:`force_portable` selects the portable branch everywhere, on CPU too, so that the test
suite and ``python -m jsoftmax verify --portable`` check it on a machine without an
accelerator. It is private: the setting is read while JAX traces, so it clears JAX's caches when
it changes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax

_ENV = "JSOFTMAX_FORCE_PORTABLE"
_forced = os.environ.get(_ENV, "").strip() not in ("", "0")


def portable_forced() -> bool:
    """Whether every op takes its portable branch, CPU included."""
    return _forced


def by_platform(cpu: Callable[..., Any], portable: Callable[..., Any], *args: Any) -> Any:
    """``cpu(*args)`` in a program lowered for CPU, ``portable(*args)`` everywhere else.

    Both branches take the same arguments and return the same pytree of arrays (same shapes and
    dtypes). Called eagerly, only the branch of the current backend is traced.
    """
    if _forced or cpu is portable:
        return portable(*args)
    return lax.platform_dependent(*args, cpu=cpu, default=portable)


@contextlib.contextmanager
def force_portable(enabled: bool = True) -> Iterator[None]:
    """Within the block, every op takes its portable branch (CPU included).

    JAX's trace and compilation caches do not know this setting, so they are cleared on entry
    and on exit; a function jitted inside the block is traced again outside it.
    """
    global _forced
    previous = _forced
    _forced = bool(enabled)
    jax.clear_caches()
    try:
        yield
    finally:
        _forced = previous
        jax.clear_caches()
