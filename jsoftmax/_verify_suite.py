r"""The Jacobian-equivalence suite behind ``python -m jsoftmax verify``.

Every public function is run on small inputs that exercise its options, and its derivatives
are compared with several independent derivations:

* ``"analytic"``: closed forms evaluated in float64 NumPy from the (rounded) inputs. Softmax
  :math:`J_{ij} = a_i(\delta_{ij} - a_j)`; log-softmax :math:`\delta_{ij} - a_j`; logsumexp
  :math:`a`; cross-entropy :math:`a \sum_j \tilde y_j - \tilde y + 2 c\,\mathrm{lse}\,a` (which
  is :math:`a - y` for a one-hot target) and :math:`-(1-\varepsilon) \log a` for float labels.
  The closed-form Jacobian is contracted with the cotangents of the ``check_vjp`` run below
  and compared with the function's VJPs (for ``softmax_jacobian``, its value is compared).
* ``"jacrev"``, ``"jacfwd"``, ``"finite-difference"``: :func:`jsoftmax.testing.check_vjp`
  against a reference: plain-JAX definitions written here for the normalizers and
  ``cross_entropy``, ``cross_entropy`` itself for ``fused_cross_entropy`` and
  ``linear_cross_entropy``. Finite differences run only with ``jax_enable_x64``. Functions
  with forward mode (all but the ``custom_vjp`` losses) also have ``jax.jvp`` of the function
  (three tangents) compared with the ``jax.jacfwd`` Jacobian of the reference, in the
  ``"jacfwd"`` row.
* ``"hessian"``: ``jax.jacrev(jax.grad(fused_cross_entropy))`` and
  ``jax.hessian(cross_entropy)`` against the closed form, per example,

  .. math::

     H = \textstyle\sum_j \tilde y_j \,(\mathrm{diag}(a) - a a^\top)
         + 2c\,\big(a a^\top + \mathrm{lse}\,(\mathrm{diag}(a) - a a^\top)\big).

``bfloat16`` inputs are compared with references computed in float32 (and with the float64
closed forms), under the looser bfloat16 tolerance of :func:`jsoftmax.testing.default_tolerance`.

All inputs share one logits shape, so the compiled primitives are reused from case to case.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax as jsm

from . import _numerics as nm
from .testing import _check_vjp as cv

DERIVATIONS = ("analytic", "jacrev", "jacfwd", "finite-difference", "hessian")
FUNCTIONS = (
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_jacobian",
    "cross_entropy",
    "fused_cross_entropy",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "linear_cross_entropy",
)
# optax's names: float labels, or integer labels; `where` is their only option.
_OPTAX_NAMES = {
    "softmax_cross_entropy": "float",
    "softmax_cross_entropy_with_integer_labels": "int",
}

_ROWS, _CLASSES = 4, 6  # one logits shape for every case
_HIDDEN = 3  # the hidden size of the linear head


def available_functions() -> tuple[str, ...]:
    """The public functions this installation has (the linear head may be absent)."""
    return tuple(f for f in FUNCTIONS if hasattr(jsm, f))


# ----------------------------------------------------------------------------------------
# Plain-JAX references. Every `where` below that guards a division or a log keeps the
# untaken branch finite, so that its (zero) cotangent cannot turn into 0 * inf = NaN.


def _mask(x: jax.Array, where: Any) -> jax.Array:
    if where is None:
        return jnp.ones(x.shape, bool)
    return jnp.broadcast_to(jnp.asarray(where, bool), x.shape)


def _ref_stats(x: jax.Array, axis: int, where: Any):
    """exp(z - m), its row sum s, and log(s) + m, with z the masked logits."""
    z = jnp.where(_mask(x, where), x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(z - m)
    s = jnp.sum(e, axis=axis, keepdims=True)
    nonempty = s > 0
    s_safe = jnp.where(nonempty, s, 1.0)
    lse = jnp.log(s_safe) + m
    return e, s_safe, lse, nonempty


def ref_softmax(x, axis=-1, where=None):
    e, s, _, _ = _ref_stats(x, axis, where)
    return e / s


def ref_log_softmax(x, axis=-1, where=None):
    _, _, lse, _ = _ref_stats(x, axis, where)
    return jnp.where(_mask(x, where), x - lse, -jnp.inf)


def ref_logsumexp(x, axis=-1, where=None, keepdims=False):
    _, _, lse, nonempty = _ref_stats(x, axis, where)
    out = jnp.where(nonempty, lse, -jnp.inf)
    return out if keepdims else jnp.squeeze(out, axis)


def ref_cross_entropy(
    logits,
    labels,
    *,
    axis=-1,
    where=None,
    label_smoothing=0.0,
    ignore_index=None,
    z_loss=0.0,
    reduction="none",
):
    """Softmax cross-entropy, written from its definition (class axis moved last)."""
    z = jnp.moveaxis(logits, axis, -1)
    incl = jnp.moveaxis(_mask(logits, where), axis, -1)
    finite = incl & jnp.isfinite(z)
    _, _, lse, _ = _ref_stats(z, -1, incl)
    log_p = jnp.where(finite, z - lse, 0.0)
    num_classes = z.shape[-1]
    is_int = jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer)
    if is_int:
        y = jax.nn.one_hot(labels, num_classes, dtype=z.dtype)
    else:
        y = jnp.moveaxis(labels, axis, -1).astype(z.dtype)
    y = jnp.where(incl, y, 0.0)
    k = jnp.sum(finite, axis=-1, keepdims=True)
    spread = label_smoothing / jnp.maximum(k, 1)
    target = (1 - label_smoothing) * y + jnp.where(finite, spread, 0.0)
    loss = -jnp.sum(target * log_p, axis=-1) + z_loss * lse[..., 0] ** 2
    loss = jnp.where(jnp.any(finite, axis=-1), loss, 0.0)
    count = loss.size
    if is_int and ignore_index is not None:
        ignored = labels == ignore_index
        loss = jnp.where(ignored, 0.0, loss)
        count = jnp.sum(~ignored)
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "mean":
        return jnp.where(count > 0, jnp.sum(loss) / jnp.maximum(count, 1), 0.0)
    return loss


def _softmax_through_jacobian(axis: int) -> Callable:
    """softmax whose VJP is read off ``jsm.softmax_jacobian``: checks the returned Jacobian."""

    @jax.custom_vjp
    def f(x):
        return jsm.softmax(x, axis=axis)

    def fwd(x):
        return f(x), x

    def bwd(x, g):
        # Contract in float32 at least, so that a 16-bit Jacobian is not summed in 16 bits.
        wide = nm.compute_dtype(x.dtype)
        jac = jsm.softmax_jacobian(x, axis=axis).astype(wide)
        g = jnp.moveaxis(g, axis, -1).astype(wide)
        v = jnp.einsum("...i,...ij->...j", g, jac)
        return (jnp.moveaxis(v, -1, axis).astype(x.dtype),)

    f.defvjp(fwd, bwd)
    return f


# ----------------------------------------------------------------------------------------
# Closed forms in float64 NumPy (class axis last).


def _np_rows(x: np.ndarray, mask: np.ndarray):
    """Probabilities a, logsumexp (-inf for empty rows), log a (0 where a = 0)."""
    z = np.where(mask, x, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(z - m)
    s = np.sum(e, axis=-1, keepdims=True)
    nonempty = s > 0
    s = np.where(nonempty, s, 1.0)
    a = e / s
    lse = np.where(nonempty, np.log(s) + m, -np.inf)
    log_a = np.where(a > 0, z - np.where(nonempty, lse, 0.0), 0.0)
    return a, lse, log_a, nonempty[..., 0]


def _block_diagonal(per_row: np.ndarray) -> np.ndarray:
    """[N, *out, *in] per-row Jacobians to the full [N, *out, N, *in]."""
    n = per_row.shape[0]
    out = np.zeros((n,) + per_row.shape[1:2] + (n,) + per_row.shape[2:])
    for r in range(n):
        out[r, ..., r, :] = per_row[r]
    return out


def _to_axis(jac_last: np.ndarray, axis: int) -> np.ndarray:
    """Moves the class axes of a [N, C, N, C] Jacobian (2-D input) back to ``axis``."""
    return jac_last if axis in (-1, 1) else np.transpose(jac_last, (1, 0, 3, 2))


def _class_last(x: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(x, axis, -1)


def analytic_softmax(x, mask, axis):
    a, _, _, _ = _np_rows(_class_last(x, axis), _class_last(mask, axis))
    per_row = a[:, :, None] * (np.eye(a.shape[-1])[None] - a[:, None, :])
    return _to_axis(_block_diagonal(per_row), axis)


def analytic_log_softmax(x, mask, axis):
    x, mask = _class_last(x, axis), _class_last(mask, axis)
    a, _, _, nonempty = _np_rows(x, mask)
    per_row = np.eye(a.shape[-1])[None] - a[:, None, :]
    # Excluded entries are the constant -inf; empty rows have no derivative at all.
    per_row = per_row * (mask & nonempty[:, None])[:, :, None]
    return _to_axis(_block_diagonal(per_row), axis)


def analytic_logsumexp(x, mask, axis):
    """The Jacobian of the row logsumexp of a 2-D input: [N, *x.shape]."""
    a, _, _, _ = _np_rows(_class_last(x, axis), _class_last(mask, axis))
    n = a.shape[0]
    jac = np.zeros((n, n, a.shape[1]))
    jac[np.arange(n), np.arange(n)] = a
    return jac if axis in (-1, 1) else np.transpose(jac, (0, 2, 1))


def analytic_softmax_jacobian(x, axis):
    a, _, _, _ = _np_rows(_class_last(x, axis), np.ones(_class_last(x, axis).shape, bool))
    return a[..., :, None] * (np.eye(a.shape[-1]) - a[..., None, :])


@dataclasses.dataclass
class _LossPieces:
    grad: np.ndarray  # d loss / d logits per row, already weighted by the reduction: [N, C]
    grad_labels: np.ndarray | None  # d loss / d labels (float labels): [N, C]
    hessian: np.ndarray  # per-row Hessian with respect to the logits: [N, C, C]
    scalar: bool  # reduction "sum"/"mean"


def analytic_loss(
    z, labels, *, where=None, label_smoothing=0.0, ignore_index=None, z_loss=0.0, reduction="none"
) -> _LossPieces:
    """Closed-form derivatives of the cross-entropy (class axis last)."""
    n, num_classes = z.shape
    incl = np.ones(z.shape, bool) if where is None else np.broadcast_to(where, z.shape)
    finite = incl & np.isfinite(z)
    a, lse, log_a, nonempty = _np_rows(z, incl)
    is_int = np.issubdtype(np.asarray(labels).dtype, np.integer)
    weight = np.ones(n)
    if is_int:
        valid = (labels >= 0) & (labels < num_classes)
        y = np.zeros(z.shape)
        y[np.arange(n)[valid], labels[valid]] = 1.0
        if ignore_index is not None:
            weight = np.where(labels == ignore_index, 0.0, 1.0)
    else:
        y = np.asarray(labels, np.float64)
    y = np.where(incl, y, 0.0)
    k = np.maximum(np.sum(finite, axis=-1, keepdims=True), 1)
    eps = label_smoothing
    target = (1 - eps) * y + np.where(finite, eps / k, 0.0)
    total = np.sum(target, axis=-1, keepdims=True)
    lse_f = np.where(nonempty[:, None], lse, 0.0)
    weight = weight * nonempty
    if reduction == "mean":
        count = np.sum(weight > 0) if is_int and ignore_index is not None else n
        weight = weight / count if count else weight * 0
    grad = a * total - target + 2 * z_loss * lse_f * a
    grad = grad * weight[:, None]
    grad_labels = None
    if not is_int:
        grad_labels = -(1 - eps) * np.where(incl, log_a, 0.0) * weight[:, None]
    outer = a[:, :, None] * a[:, None, :]
    centered = a[:, :, None] * np.eye(num_classes)[None] - outer
    hessian = total[:, :, None] * centered + 2 * z_loss * (outer + lse_f[:, :, None] * centered)
    hessian = hessian * weight[:, None, None]
    return _LossPieces(grad, grad_labels, hessian, reduction != "none")


def _loss_jacobian(rows: np.ndarray, scalar: bool) -> np.ndarray:
    """Per-row gradients [N, C] to the Jacobian of the loss output: [N, C] or [N, N, C]."""
    if scalar:
        return rows
    n = rows.shape[0]
    jac = np.zeros((n,) + rows.shape)
    jac[np.arange(n), np.arange(n)] = rows
    return jac


def _full_hessian(per_row: np.ndarray) -> np.ndarray:
    n, c, _ = per_row.shape
    out = np.zeros((n, c, n, c))
    for r in range(n):
        out[r, :, r, :] = per_row[r]
    return out


# ----------------------------------------------------------------------------------------
# Cases.


@dataclasses.dataclass
class Case:
    """One function with one set of options, on inputs of one dtype and device."""

    function: str
    name: str
    fn: Callable  # the public function, options bound, positional array arguments
    reference: Callable  # computes the same function; JAX can differentiate it both ways
    args: list  # the inputs, cast and placed on the device
    argnums: tuple[int, ...]
    analytic: Callable[[list[np.ndarray]], list[np.ndarray]]  # float64 inputs -> expected
    forward_mode: bool  # the public function supports forward mode
    value: Callable[[], list[Any]] | None = None  # softmax_jacobian: its value is checked
    hessian: tuple[Callable, Callable] | None = None  # (loss of the logits, analytic Hessian)


def _upcast(x: Any) -> Any:
    """16-bit floats to float32 (the references compute where the library does)."""
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(nm.compute_dtype(x.dtype))
    return x


def _upcasting(reference: Callable) -> Callable:
    def wrapped(*args):
        return reference(*(_upcast(a) for a in args))

    return wrapped


def _inputs(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _logits(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(_ROWS, _CLASSES)) * 2.0
    x[0, 1] += 8.0  # a confident row
    return x


def _normalizer_cases() -> list[dict[str, Any]]:
    rng = _inputs(0)
    x = _logits(rng)
    x_inf = x.copy()
    x_inf[2, 3] = -np.inf
    # axis=0 over a [4, 6] array: 6 rows of 4 classes; one column (row) fully excluded.
    mask0 = np.ones((_ROWS, _CLASSES), bool)
    mask0[:, 5] = False
    mask0[1, 0] = mask0[3, 2] = False
    return [
        {"name": "axis=-1, -inf entry", "x": x_inf, "axis": -1, "where": None},
        {"name": "axis=0, where, empty row", "x": x, "axis": 0, "where": mask0},
    ]


def _loss_cases() -> list[dict[str, Any]]:
    rng = _inputs(1)
    x = _logits(rng)
    x_inf = x.copy()
    x_inf[3, 4] = -np.inf
    where = np.ones((_ROWS, _CLASSES), bool)
    where[:, 2] = False
    where[1, 5] = False
    soft = rng.uniform(size=(_ROWS, _CLASSES)) * 0.3  # rows sum to about 0.9, not 1
    onehot = np.eye(_CLASSES)[[1, 4, 0, 3]]
    return [
        {
            "name": "int labels, where, smoothing, ignore_index, -inf logit, mean",
            "logits": x_inf,
            "labels": np.array([1, -100, 0, 3]),
            "options": {
                "where": where,
                "label_smoothing": 0.1,
                "ignore_index": -100,
                "reduction": "mean",
            },
        },
        {
            "name": "one-hot float labels, z_loss, sum",
            "logits": x,
            "labels": onehot,
            "options": {"z_loss": 1e-2, "reduction": "sum"},
        },
        {
            "name": "soft labels summing to 0.9, where, smoothing, z_loss",
            "logits": x,
            "labels": soft,
            "options": {"where": where, "label_smoothing": 0.2, "z_loss": 1e-2},
        },
    ]


def _optax_cases(kind: str) -> list[dict[str, Any]]:
    """The loss cases of ``kind`` (``"int"`` or ``"float"`` labels) with ``where`` alone."""
    cases = []
    for spec in _loss_cases():
        if np.issubdtype(spec["labels"].dtype, np.integer) != (kind == "int"):
            continue
        options = {k: v for k, v in spec["options"].items() if k == "where"}
        labels = spec["labels"]
        if kind == "int":  # in range: optax's functions have no ignore_index
            labels = np.where(labels < 0, 2, labels)
            if "where" in options:  # and on included classes
                options["where"] = np.array(options["where"]).copy()
                options["where"][np.arange(len(labels)), labels] = True
        cases.append({**spec, "name": "where", "labels": labels, "options": options})
        cases.append({**spec, "name": "plain", "labels": labels, "options": {}})
    return cases


def _linear_cases() -> list[dict[str, Any]]:
    rng = _inputs(2)
    x = rng.normal(size=(_ROWS, _HIDDEN))
    w = rng.normal(size=(_HIDDEN, _CLASSES)) * 1.5
    b = rng.normal(size=(_CLASSES,))
    return [
        {
            "name": "bias, softcap, z_loss, smoothing, ignore_index, chunk_size=3, mean",
            "x": x,
            "w": w,
            "b": b,
            "labels": np.array([5, 2, -1, 0]),
            "options": {
                "softcap": 4.0,
                "z_loss": 1e-2,
                "label_smoothing": 0.1,
                "ignore_index": -1,
                "reduction": "mean",
                "chunk_size": 3,
            },
        },
    ]


def _cast(x: np.ndarray, dtype: Any, device: Any) -> jax.Array:
    if np.issubdtype(x.dtype, np.floating):
        return jax.device_put(jnp.asarray(x, dtype), device)
    return jax.device_put(jnp.asarray(x), device)


def _as64(x: jax.Array) -> np.ndarray:
    return np.asarray(x, np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x)


def build_cases(function: str, dtype: Any, device: Any) -> list[Case]:
    """The cases of one public function, on inputs of ``dtype`` placed on ``device``."""
    put = lambda x: _cast(x, dtype, device)  # noqa: E731
    cases = []
    if function in ("softmax", "log_softmax", "logsumexp"):
        public = getattr(jsm, function)
        ref = {"softmax": ref_softmax, "log_softmax": ref_log_softmax, "logsumexp": ref_logsumexp}[
            function
        ]
        for spec in _normalizer_cases():
            axis = spec["axis"]
            where = spec["where"]
            x_in = spec["x"]
            if function == "log_softmax" and np.isneginf(x_in).any():
                # An included -inf entry has log-probability -inf with no derivative to
                # compare; log-softmax is checked on finite logits only.
                x_in = np.where(np.isneginf(x_in), -3.0, x_in)
            mask_np = np.ones(x_in.shape, bool) if where is None else where
            where_dev = None if where is None else jax.device_put(jnp.asarray(where), device)
            kw = {"axis": axis, "where": where_dev}

            def fn(x, public=public, kw=kw):
                return public(x, **kw)

            def reference(x, ref=ref, kw=kw):
                return ref(x, **kw)

            def analytic(args, function=function, axis=axis, mask=mask_np):
                x = args[0]
                if function == "softmax":
                    return [analytic_softmax(x, mask, axis)]
                if function == "log_softmax":
                    return [analytic_log_softmax(x, mask, axis)]
                return [analytic_logsumexp(x, mask, axis)]

            args = [put(x_in)]
            cases.append(
                Case(
                    function,
                    spec["name"],
                    fn,
                    _upcasting(reference),
                    args,
                    (0,),
                    analytic,
                    forward_mode=True,
                )
            )
    elif function == "softmax_jacobian":
        for spec in _normalizer_cases():
            axis = spec["axis"]
            x_in = np.where(np.isneginf(spec["x"]), -30.0, spec["x"])
            args = [put(x_in)]
            through = _softmax_through_jacobian(axis)

            def reference(x, axis=axis):
                return ref_softmax(x, axis=axis)

            def value(args=args, axis=axis):
                return [jsm.softmax_jacobian(args[0], axis=axis)]

            cases.append(
                Case(
                    function,
                    spec["name"].split(",")[0],
                    through,
                    _upcasting(reference),
                    args,
                    (0,),
                    lambda a, axis=axis: [analytic_softmax_jacobian(a[0], axis)],
                    forward_mode=False,
                    value=value,
                )
            )
    elif function in ("cross_entropy", "fused_cross_entropy") + tuple(_OPTAX_NAMES):
        public = getattr(jsm, function)
        ref = ref_cross_entropy if function == "cross_entropy" else jsm.cross_entropy
        specs = _loss_cases()
        if function in _OPTAX_NAMES:
            specs = _optax_cases(_OPTAX_NAMES[function])
        for spec in specs:
            options = dict(spec["options"])
            where = options.get("where")
            if where is not None:
                options["where"] = jax.device_put(jnp.asarray(where), device)
            is_int = np.issubdtype(spec["labels"].dtype, np.integer)
            argnums = (0,) if is_int else (0, 1)

            def fn(z, y, public=public, options=options):
                return public(z, y, **options)

            def reference(z, y, ref=ref, options=options):
                return ref(z, y, **options)

            def analytic(args, spec=spec, is_int=is_int):
                pieces = analytic_loss(args[0], args[1], **spec["options"])
                out = [_loss_jacobian(pieces.grad, pieces.scalar)]
                if not is_int:
                    out.append(_loss_jacobian(pieces.grad_labels, pieces.scalar))
                return out

            def hessian_analytic(args, spec=spec):
                return _full_hessian(analytic_loss(args[0], args[1], **spec["options"]).hessian)

            args = [put(spec["logits"]), put(spec["labels"])]
            cases.append(
                Case(
                    function,
                    spec["name"],
                    fn,
                    _upcasting(reference),
                    args,
                    argnums,
                    analytic,
                    forward_mode=function == "cross_entropy",  # the others: custom_vjp
                    hessian=(fn, hessian_analytic),
                )
            )
    elif function == "linear_cross_entropy":
        for spec in _linear_cases():
            options = spec["options"]
            ce_options = {k: v for k, v in options.items() if k not in ("softcap", "chunk_size")}
            ce_options.setdefault("reduction", "mean")
            softcap = options.get("softcap")

            def fn(x, w, b, labels, options=options):
                return jsm.linear_cross_entropy(x, w, labels, bias=b, **options)

            def reference(x, w, b, labels, softcap=softcap, ce_options=ce_options):
                z = x @ w + b[None, :]
                if softcap is not None:
                    z = softcap * jnp.tanh(z / softcap)
                return jsm.cross_entropy(z, labels, **ce_options)

            def analytic(args, softcap=softcap, ce_options=ce_options):
                x, w, b, labels = args
                z = x @ w + b[None, :]
                slope = np.ones_like(z)
                if softcap is not None:
                    slope = 1.0 - np.tanh(z / softcap) ** 2
                    z = softcap * np.tanh(z / softcap)
                pieces = analytic_loss(z, labels, **ce_options)
                dz = pieces.grad * slope
                if pieces.scalar:
                    return [dz @ w.T, x.T @ dz, dz.sum(axis=0)]
                n = x.shape[0]
                jx = np.zeros((n,) + x.shape)
                jx[np.arange(n), np.arange(n)] = dz @ w.T
                return [jx, np.einsum("nd,nv->ndv", x, dz), dz]

            args = [put(spec["x"]), put(spec["w"]), put(spec["b"]), put(spec["labels"])]
            cases.append(
                Case(
                    function,
                    spec["name"],
                    fn,
                    _upcasting(reference),
                    args,
                    (0, 1, 2),
                    analytic,
                    forward_mode=False,
                )
            )
    else:
        raise ValueError(f"function: unknown function {function!r}; expected one of {FUNCTIONS}")
    return cases


# ----------------------------------------------------------------------------------------
# Running the cases.


@dataclasses.dataclass
class Outcome:
    """The merged result of one derivation over the cases of one table row."""

    comparison: cv._Comparison = dataclasses.field(default_factory=cv._Comparison)
    cases: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, case: str, comparison: cv._Comparison, message: str = "") -> None:
        if case not in self.cases:
            self.cases.append(case)
        self.comparison.merge(comparison)
        if not comparison.passed:
            self.failures.append(f"[{case}] {message or _describe(comparison)}")

    def add_error(self, case: str, error: BaseException) -> None:
        broken = cv._Comparison(
            max_abs_error=math.inf, max_rel_error=math.inf, worst_ratio=math.inf, where=case
        )
        self.add(case, broken, f"raised {type(error).__name__}: {error}")


def _describe(c: cv._Comparison) -> str:
    text = (
        f"worst element {c.where}: got {c.actual:.9g}, expected {c.expected:.9g}, "
        f"|error| {abs(c.actual - c.expected):.3g} > tolerance {c.allowed:.3g}; "
        f"{c.num_bad} of {c.size} elements out of tolerance"
    )
    return f"{text}; {c.hint}" if c.hint else text


def _compare(actual: Any, expected: Any, dtype: Any, label: str) -> cv._Comparison:
    rtol, atol = cv.default_tolerance(dtype)
    return cv.compare_arrays(
        _as64(jnp.asarray(actual)) if not isinstance(actual, np.ndarray) else actual,
        expected,
        rtol=rtol,
        atol=atol,
        label=label,
    )


def _contract_output(ct: np.ndarray, jac: np.ndarray) -> np.ndarray:
    """vᵀ J: the cotangent contracted with the output dimensions of a full Jacobian."""
    return np.tensordot(ct, np.reshape(jac, ct.shape + (-1,)), axes=ct.ndim)


def _tangents(shape: tuple[int, ...], dtype: Any, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [np.ones(shape)] + [rng.standard_normal(shape) for _ in range(2)]
    # Rounded to the input dtype (NumPy knows bfloat16 through ml_dtypes).
    return [t.astype(dtype).astype(np.float64) for t in out]


def run_case(case: Case, dtype: Any, outcomes: dict[str, Outcome]) -> None:
    """Runs every derivation of one case, merging the results into ``outcomes``."""
    args64 = [_as64(a) for a in case.args]

    # jacrev / jacfwd / finite-difference through check_vjp.
    report = None
    try:
        report = cv.run_checks(case.fn, case.reference, case.args, argnums=case.argnums)
        if not report.value.passed:
            for d in ("jacrev", "jacfwd"):
                outcomes[d].add(
                    case.name, report.value, f"forward values differ: {_describe(report.value)}"
                )
        for arg in report.args:
            for d, c in arg.derivations.items():
                outcomes[d].add(case.name, c, f"{arg.label}, {c.cotangent}: {_describe(c)}")
    except Exception as error:  # noqa: BLE001 - a crash is a failed row, not a crashed run
        for d in ("jacrev", "jacfwd"):
            outcomes[d].add_error(case.name, error)

    # analytic: closed forms in float64 from the rounded inputs, contracted with the same
    # cotangents as fn's VJPs above (or, for softmax_jacobian, its value).
    try:
        expected = case.analytic(args64)
        c = cv._Comparison()
        if case.value is not None:
            for got, want in zip(case.value(), expected, strict=True):
                c.merge(_compare(got, want, dtype, "softmax_jacobian(x)"))
        elif report is None:
            raise RuntimeError("no VJPs to compare: check_vjp failed to run")
        else:
            for k, ct in enumerate(report.cotangents):
                for i, want in enumerate(expected):
                    got = report.fn_vjps[k][i][0]
                    label = f"vjp of {case.function} wrt arg {case.argnums[i]}"
                    want = _contract_output(ct[0], want).reshape(got.shape)
                    c.merge(_compare(got, want, dtype, label))
        outcomes["analytic"].add(case.name, c)
    except Exception as error:  # noqa: BLE001
        outcomes["analytic"].add_error(case.name, error)

    # Forward mode through the public function itself: jax.jvp against the reference's
    # jax.jacfwd Jacobian (computed by check_vjp) applied to the same tangents.
    if case.forward_mode and report is not None:
        try:
            c = cv._Comparison()
            diff = [case.args[i] for i in case.argnums]
            tangents = [_tangents(x.shape, x.dtype, seed=10 + i) for i, x in enumerate(diff)]

            def partial(*d):
                full = list(case.args)
                for i, x in zip(case.argnums, d, strict=True):
                    full[i] = x
                return case.fn(*full)

            jvp = jax.jit(lambda d, t: jax.jvp(partial, d, t)[1])  # one compilation per case
            for m in range(len(tangents[0])):
                t = [ts[m].astype(x.dtype) for ts, x in zip(tangents, diff, strict=True)]
                got = jvp(tuple(diff), tuple(t))
                want = sum(
                    np.tensordot(jac[0], ts[m], axes=ts[m].ndim)
                    for jac, ts in zip(report.reference_jacobian[0], tangents, strict=True)
                )
                c.merge(_compare(got, want, dtype, f"jvp of {case.function}"))
            outcomes["jacfwd"].add(case.name, c)
        except Exception as error:  # noqa: BLE001
            outcomes["jacfwd"].add_error(case.name, error)

    # Second order: jax.hessian of cross_entropy; reverse-over-reverse of the fused loss
    # (its only second-order mode), against the closed form and against the reference's
    # jax.hessian.
    if case.hessian is not None:
        fn, analytic = case.hessian
        rest = case.args[1:]
        try:
            expected = analytic(args64)
            c = cv._Comparison()
            if not case.forward_mode:  # a custom_vjp: reverse over reverse
                h = jax.jit(jax.jacrev(jax.grad(lambda z: jnp.sum(fn(z, *rest)))))(case.args[0])
                c.merge(_compare(h, expected, dtype, f"jacrev(grad({case.function}))"))
                ref_h = jax.jit(jax.hessian(lambda z: jnp.sum(case.reference(z, *rest))))(
                    case.args[0]
                )
                c.merge(
                    _compare(
                        h, _as64(ref_h), dtype, f"jacrev(grad({case.function})) - hessian(ref)"
                    )
                )
            else:
                h = jax.jit(jax.hessian(lambda z: jnp.sum(fn(z, *rest))))(case.args[0])
                c.merge(_compare(h, expected, dtype, "hessian(cross_entropy)"))
            outcomes["hessian"].add(case.name, c)
        except Exception as error:  # noqa: BLE001
            outcomes["hessian"].add_error(case.name, error)


def device_label(device: Any) -> str:
    return f"{device.platform}:{device.id}"


def run_suite(
    devices: Sequence[Any],
    dtypes: Sequence[str],
    functions: Sequence[str],
    progress: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Runs the suite; returns the table rows and a message per failed check."""
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    for device in devices:
        with jax.default_device(device):
            for function in functions:
                for dtype in dtypes:
                    if progress:
                        progress(f"{device_label(device)} {function} {dtype}")
                    outcomes = {d: Outcome() for d in DERIVATIONS}
                    for case in build_cases(function, dtype, device):
                        run_case(case, dtype, outcomes)
                    rtol, atol = cv.default_tolerance(dtype)
                    for derivation in DERIVATIONS:
                        o = outcomes[derivation]
                        if not o.cases:
                            continue
                        c = o.comparison
                        rows.append(
                            {
                                "device": device_label(device),
                                "function": function,
                                "dtype": dtype,
                                "derivation": derivation,
                                "max_abs_error": c.max_abs_error,
                                "max_rel_error": c.max_rel_error,
                                "passed": not o.failures,
                                "rtol": max(rtol, cv._FD_RTOL)
                                if derivation == "finite-difference"
                                else rtol,
                                "atol": max(atol, cv._FD_ATOL)
                                if derivation == "finite-difference"
                                else atol,
                                "cases": list(o.cases),
                            }
                        )
                        failures += [
                            f"{device_label(device)} {function} {dtype} {derivation} {f}"
                            for f in o.failures
                        ]
    return rows, failures
