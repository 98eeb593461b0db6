"""Check a hand-written VJP against independent derivations of a reference function.

A reverse-mode rule (a ``jax.custom_vjp`` backward pass, or a ``custom_jvp`` that JAX
transposes) is compared, for several cotangents, against up to three derivations of a
reference that computes the same function with plain JAX operations:

* ``"jacrev"``: reverse-mode autodiff of the reference (``jax.vjp``);
* ``"jacfwd"``: the full forward-mode Jacobian of the reference (``jax.jacfwd``), contracted
  with the cotangent on the host in float64;
* ``"finite-difference"``: central differences of the reference in float64 (only when
  ``jax_enable_x64`` is on, because the differences need float64 to be accurate).

The forward values of ``fn`` and ``reference`` are compared too (derivation ``"value"``),
since derivatives of two different functions cannot be expected to agree.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_vjp", "default_tolerance"]

# Default (rtol, atol) per dtype. atol is multiplied by max(1, max|expected|) of the array
# being compared, so that it stays an absolute noise floor relative to the gradient's scale.
_TOLERANCES: dict[np.dtype, tuple[float, float]] = {
    np.dtype(np.float64): (1e-9, 1e-12),
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float16): (4e-3, 2e-3),
    np.dtype(jnp.bfloat16): (3e-2, 1.6e-2),
}

# Central differences in float64 are accurate to about eps**(2/3) ~ 4e-11 relative to the
# third derivative and |phi|; these floors leave a wide margin without hiding real bugs.
_FD_RTOL = 1e-6
_FD_ATOL = 1e-6
# Step h = eps**(1/3) * max(1, |x|) balances truncation (h**2) against rounding (eps / h).
_FD_STEP = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)
# Differentiated arguments with at most this many elements in all get a full finite-difference
# gradient (two reference evaluations per element, batched into one vmap); larger ones are
# checked along random directions instead.
_FD_FULL_MAX = 2048
_FD_DIRECTIONS = 8

_NUM_RANDOM_COTANGENTS = 3
_SEED = 0

VALUE = "value"
JACREV = "jacrev"
JACFWD = "jacfwd"
FINITE_DIFFERENCE = "finite-difference"

_DESCRIPTIONS = {
    VALUE: "the forward value of reference",
    JACREV: "jacrev, the reverse-mode autodiff of reference (jax.vjp)",
    JACFWD: "jacfwd, the full Jacobian of reference from jax.jacfwd contracted with the cotangent",
    FINITE_DIFFERENCE: "finite-difference, central differences of reference in float64",
}


def default_tolerance(dtype: Any) -> tuple[float, float]:
    """Returns the default ``(rtol, atol)`` of :func:`check_vjp` for a floating dtype.

    Args:
      dtype: a floating dtype (float64, float32, float16 or bfloat16); other floating
        dtypes get the tolerance of the closest of these by machine epsilon.

    Returns:
      A pair ``(rtol, atol)``. ``atol`` is scaled by ``max(1, max|expected|)`` when used.

    Examples:
      >>> from jsoftmax.testing import default_tolerance
      >>> default_tolerance("float32")
      (2e-05, 2e-06)
    """
    dtype = np.dtype(dtype)
    if dtype in _TOLERANCES:
        return _TOLERANCES[dtype]
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    eps = float(jnp.finfo(dtype).eps)
    closest = min(_TOLERANCES, key=lambda d: abs(np.log(float(jnp.finfo(d).eps) / eps)))
    return _TOLERANCES[closest]


def _weakest_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """The floating dtype with the largest machine epsilon."""
    floats = [np.dtype(d) for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    if not floats:
        return np.dtype(np.float32)
    return max(floats, key=lambda d: float(jnp.finfo(d).eps))


def _x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


# ----------------------------------------------------------------------------------------
# Comparison of two arrays.


@dataclasses.dataclass
class _Comparison:
    """The worst disagreement found by one comparison (or the merge of several)."""

    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    worst_ratio: float = 0.0  # |actual - expected| / allowed at the worst element; > 1 fails
    num_bad: int = 0
    size: int = 0
    rtol: float = 0.0
    atol: float = 0.0  # the atol actually applied (after scaling) at the worst comparison
    where: str = ""  # the worst element, e.g. "logits[1, 2]"
    cotangent: str = ""
    actual: float = 0.0
    expected: float = 0.0
    allowed: float = 0.0
    hint: str = ""

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0

    def merge(self, other: _Comparison) -> None:
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.max_rel_error = max(self.max_rel_error, other.max_rel_error)
        if other.worst_ratio > self.worst_ratio or not self.where:
            for field in (
                "worst_ratio",
                "num_bad",
                "size",
                "rtol",
                "atol",
                "where",
                "cotangent",
                "actual",
                "expected",
                "allowed",
                "hint",
            ):
                setattr(self, field, getattr(other, field))


def _format_index(label: str, index: tuple[int, ...]) -> str:
    if not index:
        return label
    return f"{label}[{', '.join(str(int(i)) for i in index)}]"


def compare_arrays(
    actual: Any,
    expected: Any,
    *,
    rtol: float,
    atol: float,
    scale_atol: bool = True,
    skip: np.ndarray | None = None,
    label: str = "",
    index_label: Callable[[tuple[int, ...]], str] | None = None,
    hints: bool = True,
) -> _Comparison:
    """Compares ``actual`` against ``expected`` elementwise, on the host in float64.

    An element passes when ``|actual - expected| <= atol' + rtol * |expected|``, where
    ``atol' = atol * max(1, max|expected|)`` when ``scale_atol`` (else ``atol``). Non-finite
    elements must match exactly (NaN with NaN, inf with an inf of the same sign). Elements
    where ``skip`` is true are not compared.

    The relative error reported is the worst ``|actual - expected| / max(|expected|, atol' /
    rtol)``: the plain relative error for elements above the absolute noise floor, and the
    absolute error in the same units below it, so that an element within ``rtol`` passes
    and a passing element is within ``2 * rtol``.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{label}: shape {a.shape} differs from the expected {e.shape}")
    keep = np.ones(e.shape, dtype=bool) if skip is None else ~np.asarray(skip, dtype=bool)
    finite = np.isfinite(a) & np.isfinite(e)
    # Non-finite values must agree exactly; a mismatch is an infinitely bad error.
    same_nonfinite = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e))
    mismatch = keep & ~finite & ~same_nonfinite
    both = keep & finite
    scale = float(np.max(np.abs(e[both]), initial=0.0))
    atol_eff = atol * max(1.0, scale) if scale_atol else atol
    with np.errstate(invalid="ignore"):
        diff = np.where(both, np.abs(a - e), 0.0)
    allowed = atol_eff + rtol * np.abs(np.where(both, e, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, diff / allowed, np.where(diff > 0, np.inf, 0.0))
    ratio = np.where(mismatch, np.inf, ratio)
    floor = atol_eff / rtol if rtol > 0 else np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        denominator = np.maximum(np.abs(np.where(both, e, 0.0)), floor)
        rel = np.where(diff > 0, diff / denominator, 0.0)
    out = _Comparison(
        max_abs_error=float(np.max(diff, initial=0.0)),
        max_rel_error=float(np.max(rel, initial=0.0)),
        num_bad=int(np.sum(ratio > 1.0)),
        size=int(np.sum(keep)),
        rtol=rtol,
        atol=atol_eff,
    )
    if np.any(mismatch):
        out.max_abs_error = out.max_rel_error = float("inf")
    if e.size == 0 or not np.any(keep):
        out.where = label
        return out
    flat = int(np.argmax(np.where(keep, ratio, -1.0)))
    index = np.unravel_index(flat, e.shape) if e.shape else ()
    out.worst_ratio = float(ratio[index])
    out.where = index_label(tuple(index)) if index_label else _format_index(label, tuple(index))
    out.actual = float(a[index])
    out.expected = float(e[index])
    out.allowed = float(allowed[index])
    if hints and not out.passed:
        out.hint = _hint(a, e, keep & finite, atol_eff, out.num_bad)
    return out


def _hint(a: np.ndarray, e: np.ndarray, ok: np.ndarray, atol: float, num_bad: int) -> str:
    """A guess at the kind of mistake, from the shape of the disagreement."""
    if np.all(a[ok] == 0) and np.any(e[ok] != 0):
        return "the VJP is zero everywhere: does the rule return zeros for this argument?"
    big = ok & (np.abs(e) > max(atol, 1e-30))
    if np.sum(big) >= 2:
        factors = a[big] / e[big]
        middle = float(np.median(factors))
        if abs(middle - 1.0) > 1e-3 and np.all(np.abs(factors - middle) <= 1e-3 * abs(middle)):
            return f"the VJP is {middle:.6g} times the expected value everywhere: a wrong factor?"
    if num_bad == 1 and e.size > 1:
        return "only this element is out of tolerance: look for an update of a single entry."
    return ""


# ----------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class _ArgResult:
    argnum: int
    name: str | None
    derivations: dict[str, _Comparison]
    # reference's own jacrev against its own jacfwd: if these disagree, the reference is
    # suspect rather than fn.
    reference_consistency: _Comparison | None = None

    @property
    def label(self) -> str:
        return f"argument {self.argnum}" + (f" ('{self.name}')" if self.name else "")


@dataclasses.dataclass
class VJPReport:
    """Everything :func:`check_vjp` measured; ``as_dict()`` is what it returns."""

    dtype: str
    rtol: float
    atol: float
    num_cotangents: int
    value: _Comparison
    args: list[_ArgResult]
    # The raw material, in float64, for further comparisons (the verify suite uses it):
    # cotangents[k][output leaf] (None for integer outputs); fn_vjps[k][arg][leaf];
    # reference_jacobian[floating output leaf][arg][leaf], shaped output + input.
    cotangents: list[list[np.ndarray | None]] = dataclasses.field(default_factory=list)
    fn_vjps: list[list[list[np.ndarray]]] = dataclasses.field(default_factory=list)
    reference_jacobian: list[list[list[np.ndarray]]] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        checks = [c for r in self.args for c in r.derivations.values()]
        return self.value.passed and all(c.passed for c in checks)

    def as_dict(self) -> dict[str, Any]:
        def entry(c: _Comparison) -> dict[str, Any]:
            return {
                "max_abs_error": c.max_abs_error,
                "max_rel_error": c.max_rel_error,
                "rtol": c.rtol,
                "atol": c.atol,
                "passed": c.passed,
            }

        return {
            "dtype": self.dtype,
            "rtol": self.rtol,
            "atol": self.atol,
            "num_cotangents": self.num_cotangents,
            "value": entry(self.value),
            "args": {
                r.argnum: {"name": r.name, **{d: entry(c) for d, c in r.derivations.items()}}
                for r in self.args
            },
        }

    def failures(self) -> list[tuple[str, str, _Comparison]]:
        """``(argument label, derivation, comparison)`` for every failing check, in order."""
        out = []
        if not self.value.passed:
            out.append(("the outputs", VALUE, self.value))
        for r in self.args:
            for d, c in r.derivations.items():
                if not c.passed:
                    out.append((r.label, d, c))
        return out

    def failure_message(self) -> str:
        failures = self.failures()
        if not failures:
            return ""
        label, derivation, c = failures[0]
        if derivation == VALUE:
            lines = [
                "check_vjp: fn and reference return different values, so their derivatives "
                "cannot be compared.",
                f"  worst element: {c.where}",
                f"    fn:          {c.actual:.9g}",
                f"    reference:   {c.expected:.9g}",
            ]
        else:
            lines = [
                f"check_vjp: fn's VJP with respect to {label} disagrees with "
                f"{_DESCRIPTIONS[derivation]}.",
                f"  worst element: {c.where}, with {c.cotangent}",
                f"    fn's VJP:    {c.actual:.9g}",
                f"    {derivation + ':':<13}{c.expected:.9g}",
            ]
        lines += [
            f"    |error|:     {abs(c.actual - c.expected):.3g} > tolerance {c.allowed:.3g} "
            f"(atol {c.atol:.3g} + rtol {c.rtol:.3g} * |expected|)",
            f"  {c.num_bad} of {c.size} elements out of tolerance; dtype {self.dtype}.",
        ]
        if c.hint:
            lines.append(f"  hint: {c.hint}")
        if derivation != VALUE:
            arg = next(r for r in self.args if r.label == label)
            rc = arg.reference_consistency
            if rc is not None and not rc.passed:
                lines.append(
                    "  note: reference's own jacrev and jacfwd disagree here too (worst error "
                    f"{rc.max_abs_error:.3g} at {rc.where}): check reference for a custom rule "
                    "or a non-differentiable point."
                )
        for other_label, other_derivation, other in failures[1:]:
            lines.append(
                f"  also: {other_label} vs {other_derivation} (worst error "
                f"{other.max_abs_error:.3g} at {other.where}, {other.num_bad} of "
                f"{other.size} elements)"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# The checks.


def _normalize_argnums(argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    if isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool):
        argnums = (int(argnums),)
    elif isinstance(argnums, Sequence) and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in argnums
    ):
        argnums = tuple(int(i) for i in argnums)
    else:
        raise TypeError(f"argnums: expected an int or a tuple of ints, got {argnums!r}")
    if not argnums:
        raise ValueError("argnums: expected at least one argument to differentiate")
    out = []
    for i in argnums:
        if not -nargs <= i < nargs:
            raise ValueError(f"argnums: {i} is out of range for {nargs} positional arguments")
        out.append(i % nargs)
    if len(set(out)) != len(out):
        raise ValueError(f"argnums: repeated argument in {argnums}")
    return tuple(out)


def _positional_names(f: Callable) -> list[str]:
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return []
    names = []
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return names


def _check_tolerance(name: str, value: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float, np.floating, np.integer)) or not value >= 0:
        raise ValueError(f"{name}: expected a non-negative number or None, got {value!r}")


def run_checks(
    fn: Callable,
    reference: Callable,
    args: Sequence[Any],
    argnums: int | Sequence[int] = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VJPReport:
    """Runs every comparison of :func:`check_vjp` and returns the report without raising."""
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if not callable(reference):
        raise TypeError(f"reference: expected a callable, got {type(reference).__name__}")
    _check_tolerance("rtol", rtol)
    _check_tolerance("atol", atol)
    args = list(args)
    argnums = _normalize_argnums(argnums, len(args))
    fn_names, ref_names = _positional_names(fn), _positional_names(reference)

    def arg_name(i: int) -> str | None:
        for names in (fn_names, ref_names):
            if i < len(names):
                return names[i]
        return None

    # The differentiated arguments, as pytrees of arrays.
    diff = []
    for i in argnums:
        leaves, treedef = jax.tree_util.tree_flatten(args[i])
        if not leaves:
            raise ValueError(f"argnums: argument {i} has no array leaves to differentiate")
        arrays = []
        for leaf in leaves:
            x = jnp.asarray(leaf)
            if not _is_float(x.dtype):
                raise TypeError(
                    f"argnums: argument {i}"
                    + (f" ('{arg_name(i)}')" if arg_name(i) else "")
                    + f" has dtype {x.dtype}; only real floating arguments can be differentiated"
                    " (leave integer arguments out of argnums)"
                )
            arrays.append(x)
        diff.append(jax.tree_util.tree_unflatten(treedef, arrays))

    def bind(f: Callable) -> Callable:
        def partial(*d: Any) -> Any:
            full = list(args)
            for i, x in zip(argnums, d, strict=True):
                full[i] = x
            return f(*full)

        return partial

    fn_p, ref_p = bind(fn), bind(reference)

    out_fn_shape = jax.eval_shape(fn_p, *diff)
    out_ref_shape = jax.eval_shape(ref_p, *diff)
    fn_paths, fn_tree = jax.tree_util.tree_flatten_with_path(out_fn_shape)
    ref_leaves, ref_tree = jax.tree_util.tree_flatten(out_ref_shape)
    if fn_tree != ref_tree:
        raise AssertionError(
            f"check_vjp: fn returns a pytree {fn_tree} but reference returns {ref_tree}"
        )
    out_labels = ["output" + jax.tree_util.keystr(p) for p, _ in fn_paths]
    fn_leaves = [s for _, s in fn_paths]
    for lab, a, b in zip(out_labels, fn_leaves, ref_leaves, strict=True):
        if a.shape != b.shape:
            raise AssertionError(
                f"check_vjp: {lab} has shape {a.shape} from fn but {b.shape} from reference"
            )
    float_out = [
        _is_float(s.dtype) and _is_float(r.dtype)
        for s, r in zip(fn_leaves, ref_leaves, strict=True)
    ]
    if not any(float_out):
        raise ValueError("fn: has no floating output to differentiate")

    diff_leaves = jax.tree_util.tree_leaves(diff)
    dtype = _weakest_dtype(
        [x.dtype for x in diff_leaves]
        + [s.dtype for s, f in zip(fn_leaves, float_out, strict=True) if f]
    )
    default_rtol, default_atol = default_tolerance(dtype)
    rtol_ = default_rtol if rtol is None else float(rtol)
    atol_ = default_atol if atol is None else float(atol)
    scale_atol = atol is None

    # Cotangents: all ones, then seeded standard normals, in each output leaf's dtype.
    rng = np.random.default_rng(_SEED)
    cotangents: list[list[np.ndarray | None]] = []
    cot_labels = ["the all-ones cotangent"]
    for k in range(1 + _NUM_RANDOM_COTANGENTS):
        ct = []
        for s, f in zip(fn_leaves, float_out, strict=True):
            if not f:
                ct.append(None)
            else:
                c = np.ones(s.shape) if k == 0 else rng.standard_normal(s.shape)
                # Round to fn's output dtype so that every derivation sees the same numbers.
                ct.append(c.astype(s.dtype).astype(np.float64))
        cotangents.append(ct)
        if k:
            cot_labels.append(f"random cotangent #{k} (seed {_SEED})")

    x64 = _x64_enabled()
    fd_cotangents: list[list[np.ndarray | None]] = []
    ref64_outputs = None
    if x64:
        # Finite differences look only at outputs that are finite at the base point: a
        # constant -inf output (a masked log-probability) has no derivative to measure.
        diff64 = _to_float64(diff)
        ref64_outputs = [
            np.asarray(o, np.float64) if f else None
            for o, f in zip(jax.tree_util.tree_leaves(ref_p(*diff64)), float_out, strict=True)
        ]
        for ct in cotangents:
            fd_cotangents.append(
                [
                    None if c is None else np.where(np.isfinite(o), c, 0.0)
                    for c, o in zip(ct, ref64_outputs, strict=True)
                ]
            )

    all_cts = cotangents + fd_cotangents

    def cast(ct: list, shapes: list) -> Any:
        # Integer outputs take a float0 cotangent.
        leaves = [
            np.zeros(s.shape, jax.dtypes.float0) if c is None else c.astype(s.dtype)
            for c, s in zip(ct, shapes, strict=True)
        ]  # NumPy casts on the host (bfloat16 through ml_dtypes): no device work per cast
        return jax.tree_util.tree_unflatten(fn_tree, leaves)

    n_diff = len(diff)

    def core(diff: list, cts: list) -> Any:
        out_f, vjp_f = jax.vjp(fn_p, *diff)
        out_r, vjp_r = jax.vjp(ref_p, *diff)
        jac = jax.jacfwd(
            lambda *d: [
                o for o, f in zip(jax.tree_util.tree_leaves(ref_p(*d)), float_out, strict=True) if f
            ],
            argnums=tuple(range(n_diff)),
        )(*diff)
        vjps_f = [vjp_f(cast(ct, fn_leaves)) for ct in cts]
        vjps_r = [vjp_r(cast(ct, ref_leaves)) for ct in cts]
        return out_f, out_r, vjps_f, vjps_r, jac

    # One jit of the whole comparison: a single compilation per call is faster than dispatching
    # (and compiling) every primitive of the VJPs and the forward-mode Jacobian one at a time.
    cts = all_cts
    out_f, out_r, vjps_f, vjps_r, jac = jax.device_get(jax.jit(core)(diff, cts))

    # Forward values.
    value = _Comparison()
    for lab, a, b in zip(
        out_labels, jax.tree_util.tree_leaves(out_f), jax.tree_util.tree_leaves(out_r), strict=True
    ):
        value.merge(
            compare_arrays(
                a, b, rtol=rtol_, atol=atol_, scale_atol=scale_atol, label=lab, hints=False
            )
        )

    # Flatten the per-argument results: leaves[arg][leaf] with labels.
    arg_leaf_paths = []
    for i, d in zip(argnums, diff, strict=True):
        paths, _ = jax.tree_util.tree_flatten_with_path(d)
        base = arg_name(i) or f"args[{i}]"
        arg_leaf_paths.append([base + jax.tree_util.keystr(p) for p, _ in paths])

    def leaves_of(vjp_result: Any, a: int) -> list[np.ndarray]:
        return [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(vjp_result[a])]

    # jac: one entry per floating output leaf, each a tuple over arguments of arg pytrees.
    float_cts_idx = [o for o, f in enumerate(float_out) if f]

    jac64 = [
        [
            [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(per_arg)]
            for per_arg in jac[j]
        ]
        for j in range(len(float_cts_idx))
    ]

    def contract(ct: list, a: int) -> list[np.ndarray]:
        out = None
        for j, o in enumerate(float_cts_idx):
            term = [np.tensordot(ct[o], x, axes=ct[o].ndim) for x in jac64[j][a]]
            out = term if out is None else [u + v for u, v in zip(out, term, strict=True)]
        return out

    fd_expected = None
    if x64:
        fd_expected = _finite_differences(
            ref_p, diff, float_out, fd_cotangents, fn_leaves, vjps_f[len(cotangents) :]
        )

    arg_results = []
    n_ct = len(cotangents)
    for a, i in enumerate(argnums):
        labels = arg_leaf_paths[a]
        derivs = {JACREV: _Comparison(), JACFWD: _Comparison()}
        if x64:
            derivs[FINITE_DIFFERENCE] = _Comparison()
        consistency = _Comparison()
        for k in range(n_ct):
            got = leaves_of(vjps_f[k], a)
            rev = leaves_of(vjps_r[k], a)
            fwd = contract(cotangents[k], a)
            for leaf, lab in enumerate(labels):
                kw = dict(rtol=rtol_, atol=atol_, scale_atol=scale_atol, label=lab)
                for d, exp in ((JACREV, rev[leaf]), (JACFWD, fwd[leaf])):
                    c = compare_arrays(got[leaf], exp, **kw)
                    c.cotangent = cot_labels[k]
                    derivs[d].merge(c)
                consistency.merge(compare_arrays(rev[leaf], fwd[leaf], **kw))
            if x64:
                got_fd = leaves_of(vjps_f[n_ct + k], a)
                rev_fd = leaves_of(vjps_r[n_ct + k], a)
                for leaf, lab in enumerate(labels):
                    expected, actual, directional = fd_expected[k][a][leaf]
                    if directional is None:
                        actual = got_fd[leaf]
                        skip = ~np.isfinite(expected) | ~np.isfinite(rev_fd[leaf])
                        index_label = None
                    else:
                        skip = ~np.isfinite(expected)
                        index_label = _direction_label(lab)
                    c = compare_arrays(
                        actual,
                        expected,
                        rtol=max(rtol_, _FD_RTOL),
                        atol=max(atol_, _FD_ATOL),
                        scale_atol=True,
                        skip=skip,
                        label=lab,
                        index_label=index_label,
                    )
                    c.cotangent = cot_labels[k]
                    derivs[FINITE_DIFFERENCE].merge(c)
        arg_results.append(_ArgResult(i, arg_name(i), derivs, consistency))

    return VJPReport(
        dtype=str(dtype),
        rtol=rtol_,
        atol=atol_,
        num_cotangents=n_ct,
        value=value,
        args=arg_results,
        cotangents=cotangents,
        fn_vjps=[[leaves_of(vjps_f[k], a) for a in range(n_diff)] for k in range(n_ct)],
        reference_jacobian=jac64,
    )


def _direction_label(lab: str) -> Callable[[tuple[int, ...]], str]:
    return lambda index: f"{lab} along random direction #{index[0] + 1}"


def _to_float64(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), tree)


def _finite_differences(
    ref_p: Callable,
    diff: list,
    float_out: list[bool],
    fd_cotangents: list[list[np.ndarray | None]],
    fn_leaves: list,
    vjps_fn_fd: list,
) -> list[list[list[tuple[np.ndarray, np.ndarray | None, Any]]]]:
    """Central differences of ``<ct, reference(x)>`` in float64, for every cotangent.

    Returns ``out[k][arg][leaf] = (expected, actual, directional)``. When all differentiated
    leaves together have at most ``_FD_FULL_MAX`` elements, ``expected`` is the full gradient
    (``actual`` None: the caller uses fn's VJP), from one batched evaluation of the reference
    over every perturbation of every element. Otherwise each leaf is checked along random
    directions, and ``actual`` is fn's VJP projected on the same directions.
    """
    diff64 = _to_float64(diff)
    n_ct = len(fd_cotangents)
    # Stack the cotangents of each floating output leaf: [K, *shape].
    stacked = [
        None if not f else np.stack([ct[o] for ct in fd_cotangents])
        for o, f in enumerate(float_out)
    ]

    def phis(d: list) -> jax.Array:
        outs = jax.tree_util.tree_leaves(ref_p(*d))
        total = jnp.zeros((n_ct,), jnp.float64)
        for o, (out, f) in enumerate(zip(outs, float_out, strict=True)):
            if f:
                out = jnp.asarray(out, jnp.float64)
                ct = jnp.asarray(stacked[o])
                # Outputs that are not finite at the base point carry a zero cotangent; keep
                # them out of the sum so that inf * 0 does not poison it.
                term = jnp.where(ct != 0, ct * out[None], 0.0)
                total = total + jnp.sum(term.reshape(n_ct, -1), axis=1)
        return total

    flat, treedefs = [], []
    for arg in diff64:
        leaves, treedef = jax.tree_util.tree_flatten(arg)
        flat.append([np.asarray(x) for x in leaves])
        treedefs.append(treedef)

    def evaluate(*batched_leaves: jax.Array) -> jax.Array:
        it = iter(batched_leaves)
        d = [
            jax.tree_util.tree_unflatten(t, [next(it) for _ in leaves])
            for t, leaves in zip(treedefs, flat, strict=True)
        ]
        return phis(d)

    all_leaves = [x for leaves in flat for x in leaves]
    total_size = sum(x.size for x in all_leaves)
    out: list[list[list[Any]]] = [[[None] * len(leaves) for leaves in flat] for _ in range(n_ct)]

    if total_size <= _FD_FULL_MAX:
        # Row r of the batch moves one element of one leaf by +h (first half) or -h.
        steps = []
        batched = [np.repeat(x[None], 2 * total_size, axis=0) for x in all_leaves]
        row = 0
        for li, x in enumerate(all_leaves):
            finite = np.isfinite(x)
            h = np.where(finite, _FD_STEP * np.maximum(1.0, np.abs(np.where(finite, x, 0.0))), 0.0)
            for e in range(x.size):
                idx = np.unravel_index(e, x.shape)
                plus = x[idx] + h[idx]
                minus = x[idx] - h[idx]
                batched[li][(row,) + idx] = plus
                batched[li][(total_size + row,) + idx] = minus
                # Divide by the step actually taken, after rounding of x + h and x - h.
                steps.append(plus - minus if finite[idx] else np.nan)
                row += 1
        values = np.asarray(jax.vmap(evaluate)(*[jnp.asarray(b) for b in batched]))
        steps = np.asarray(steps)
        with np.errstate(invalid="ignore"):
            grads = (values[:total_size] - values[total_size:]) / steps[:, None]
        start = 0
        for a, leaves in enumerate(flat):
            for j, x in enumerate(leaves):
                g = grads[start : start + x.size]
                start += x.size
                for k in range(n_ct):
                    out[k][a][j] = (g[:, k].reshape(x.shape), None, None)
        return out

    rng = np.random.default_rng(_SEED + 1)
    base = [jnp.asarray(x) for x in all_leaves]
    li = 0
    for a, leaves in enumerate(flat):
        for j, x in enumerate(leaves):
            finite = np.isfinite(x)
            dirs = rng.standard_normal((_FD_DIRECTIONS,) + x.shape) * finite[None]
            h = _FD_STEP * max(1.0, float(np.max(np.abs(x[finite]), initial=0.0)))
            moved = jnp.asarray(np.concatenate([x[None] + h * dirs, x[None] - h * dirs]))

            def along(v: jax.Array, li: int = li) -> jax.Array:
                return evaluate(*[v if i == li else b for i, b in enumerate(base)])

            values = np.asarray(jax.vmap(along)(moved))
            fd = (values[:_FD_DIRECTIONS] - values[_FD_DIRECTIONS:]) / (2 * h)
            for k in range(n_ct):
                g = np.asarray(jax.tree_util.tree_leaves(vjps_fn_fd[k][a])[j], np.float64)
                proj = np.tensordot(dirs, np.where(finite, g, 0.0), axes=g.ndim)
                out[k][a][j] = (fd[:, k], proj, True)
            li += 1
    return out


def check_vjp(
    fn: Callable,
    reference: Callable,
    *args: Any,
    argnums: int | Sequence[int] = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> dict[str, Any]:
    r"""Checks ``fn``'s reverse-mode derivatives against independent derivations of ``reference``.

    ``fn`` is usually a ``jax.custom_vjp`` function with a hand-written backward pass, and
    ``reference`` the same function written with plain JAX operations. For every argument in
    ``argnums`` and several cotangents :math:`v` (all ones, then seeded standard normals), the
    vector-Jacobian product of ``fn`` is compared with

    * ``"jacrev"``: ``jax.vjp`` of ``reference``;
    * ``"jacfwd"``: the full Jacobian of ``reference`` from ``jax.jacfwd``, contracted with
      :math:`v` on the host in float64;
    * ``"finite-difference"`` (only when ``jax_enable_x64`` is on): central differences of
      :math:`\phi(x) = \langle v, \mathrm{reference}(x)\rangle` in float64, with step
      :math:`h = \epsilon^{1/3} \max(1, |x_i|)` per element (along 8 random directions per
      leaf when the differentiated arguments hold more than 2048 elements in all).

    .. math::

        \bigl| (v^\top J_{\mathrm{fn}})_i - (v^\top J_{\mathrm{ref}})_i \bigr|
        \le \mathrm{atol} \cdot \max(1, \max_j |(v^\top J_{\mathrm{ref}})_j|)
        + \mathrm{rtol} \cdot |(v^\top J_{\mathrm{ref}})_i|

    must hold for every element (the scaling of ``atol`` applies to the default only).
    Non-finite values must match exactly. The forward values of ``fn`` and ``reference`` are
    compared first. Finite differences use tolerances no tighter than ``rtol = atol = 1e-6``,
    and skip elements where the reference's derivative is not finite. ``fn`` may be jitted;
    arguments outside ``argnums`` (integer labels, masks, pytrees) are passed through as they
    are. The Jacobian is materialized, so keep the inputs small.

    Args:
      fn: the function whose VJP is checked; returns an array or a pytree of arrays.
      reference: the same function, differentiable by JAX in both modes.
      *args: the positional arguments of both functions.
      argnums: an int or a tuple of ints, the arguments to differentiate (each a floating
        array or a pytree of them).
      rtol: relative tolerance; by default from the weakest floating dtype among the
        differentiated arguments and the outputs (float64 ``1e-9``, float32 ``2e-5``,
        float16 ``4e-3``, bfloat16 ``3e-2``).
      atol: absolute tolerance; by default ``1e-12``, ``2e-6``, ``2e-3``, ``1.6e-2`` for those
        dtypes, scaled by the magnitude of the expected VJP.

    Returns:
      A dict: ``"dtype"``, ``"rtol"``, ``"atol"``, ``"num_cotangents"``, ``"value"`` (the
      comparison of forward values) and ``"args"``, mapping each argnum to ``{"name": ...,
      "jacrev": ..., "jacfwd": ..., "finite-difference": ...}`` where each derivation holds
      ``max_abs_error``, ``max_rel_error``, ``rtol``, ``atol`` and ``passed``. The relative
      error of an element is ``|error| / max(|expected|, atol / rtol)``, so it is at most
      ``2 * rtol`` when the check passes.

    Raises:
      AssertionError: when anything disagrees. The message names the argument, the
        derivation, the worst element's index and cotangent, both values and the tolerance.

    Examples:
      A soft-label cross-entropy with a hand-written backward pass:

      >>> import jax, jax.numpy as jnp
      >>> from jsoftmax.testing import check_vjp
      >>> def reference(logits, labels):
      ...     return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)
      >>> @jax.custom_vjp
      ... def xent(logits, labels):
      ...     return reference(logits, labels)
      >>> def xent_fwd(logits, labels):
      ...     log_p = jax.nn.log_softmax(logits)
      ...     return -jnp.sum(labels * log_p, axis=-1), (log_p, labels)
      >>> def xent_bwd(res, g):
      ...     log_p, labels = res
      ...     g = g[..., None]
      ...     total = jnp.sum(labels, axis=-1, keepdims=True)
      ...     return g * (jnp.exp(log_p) * total - labels), -g * log_p
      >>> xent.defvjp(xent_fwd, xent_bwd)
      >>> logits = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
      >>> labels = jnp.array([[0.2, 0.7, 0.1], [0.0, 0.5, 0.25]])
      >>> report = check_vjp(xent, reference, logits, labels, argnums=(0, 1))
      >>> report["args"][1]["name"], report["args"][0]["jacfwd"]["passed"]
      ('labels', True)

      The textbook rule ``p - labels`` is wrong for labels that do not sum to one:

      >>> def wrong_bwd(res, g):
      ...     log_p, labels = res
      ...     return g[..., None] * (jnp.exp(log_p) - labels), -g[..., None] * log_p
      >>> xent.defvjp(xent_fwd, wrong_bwd)
      >>> check_vjp(xent, reference, logits, labels, argnums=(0, 1))
      Traceback (most recent call last):
      AssertionError: check_vjp: fn's VJP with respect to argument 0 ('logits') disagrees ...
    """
    report = run_checks(fn, reference, args, argnums=argnums, rtol=rtol, atol=atol)
    if not report.passed:
        raise AssertionError(report.failure_message())
    return report.as_dict()
