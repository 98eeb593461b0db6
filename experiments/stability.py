"""Well-known numerical failures of softmax and cross-entropy, reproduced and shown to be gone.

Six checks, each in float32 against an exact reference (mpmath with 60 digits, or float64):

1. overflow: the textbook ``exp(z) / Σ exp(z)`` on ``[123, 456, 789]`` gives NaN;
2. cross-entropy from probabilities (softmax, then log) against cross-entropy from logits as
   the logits grow by a factor 1 ... 1e4;
3. the loss of a confident, correct prediction (true value 1e-9 ... 1e-30), which rounds to 0
   when ``log Σ exp`` is formed before the label's logit is subtracted;
4. "push all, pull one": the gradient of the loss is ``softmax(z) − onehot(label)``;
5. two classes: softmax cross-entropy equals sigmoid binary cross-entropy of the logit
   difference, in value and gradient;
6. temperature: ``softmax(z / T)`` tends to the one-hot vector of the argmax as ``T → 0``.

Example::

    python experiments/stability.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax

import jsoftmax as jsm

F32 = jnp.float32
# Every mpmath computation runs at 60 significant digits, without changing the global setting.
_high_precision = mpmath.workdps(60)


# --- exact references (mpmath, 60 significant digits) -------------------------------------------


@_high_precision
def mp_logsumexp(z: Sequence[float]) -> mpmath.mpf:
    zs = [mpmath.mpf(float(v)) for v in z]
    top = max(zs)
    return top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in zs))


@_high_precision
def mp_softmax(z: Sequence[float]) -> list[mpmath.mpf]:
    lse = mp_logsumexp(z)
    return [mpmath.exp(mpmath.mpf(float(v)) - lse) for v in z]


@_high_precision
def mp_cross_entropy(z: Sequence[float], label: int) -> mpmath.mpf:
    return mp_logsumexp(z) - mpmath.mpf(float(z[label]))


@_high_precision
def mp_binary(d: float, y: int) -> tuple[mpmath.mpf, mpmath.mpf]:
    """Binary cross-entropy ``softplus(d) − y·d`` and its derivative ``σ(d) − y``."""
    v = mpmath.mpf(float(d))
    return mpmath.log1p(mpmath.exp(v)) - y * v, 1 / (1 + mpmath.exp(-v)) - y


@_high_precision
def rel_err(x: float, ref: mpmath.mpf) -> float:
    """``|x − ref| / |ref|`` in high precision; ``inf`` when ``x`` is not finite."""
    if not np.isfinite(x):
        return float("inf")
    return float(abs(mpmath.mpf(float(x)) - ref) / abs(ref))


# --- the textbook formulas that fail ------------------------------------------------------------


def naive_softmax(z: jax.Array, axis: int = -1) -> jax.Array:
    """``exp(z) / Σ exp(z)`` without the max shift: overflows once a logit exceeds ~88.7."""
    e = jnp.exp(z)
    return e / jnp.sum(e, axis=axis, keepdims=True)


@jax.jit
def ce_via_naive_softmax(z: jax.Array, label: jax.Array) -> jax.Array:
    """Textbook softmax, then log: exp overflows to inf, and inf/inf is NaN."""
    return -jnp.log(naive_softmax(z)[label])


@jax.jit
def ce_via_stable_softmax(z: jax.Array, label: jax.Array) -> jax.Array:
    """Stable softmax, then log: the probability underflows to 0 and the log gives inf."""
    return -jnp.log(jax.nn.softmax(z)[label])


@jax.jit
def ce_via_log_softmax(z: jax.Array, label: jax.Array) -> jax.Array:
    """``jax.nn.log_softmax``: ``z − max − log Σ exp(z − max)``, which rounds 1 + tiny to 1."""
    return -jax.nn.log_softmax(z)[label]


@jax.jit
def ce_jsm(z: jax.Array, label: jax.Array) -> jax.Array:
    return jsm.cross_entropy(z, label)


@jax.jit
def ce_jsm_fused(z: jax.Array, label: jax.Array) -> jax.Array:
    return jsm.fused_cross_entropy(z, label)


@jax.jit
def ce_optax(z: jax.Array, label: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(z, label)


# --- the six checks -----------------------------------------------------------------------------


def check_overflow() -> dict[str, Any]:
    """``softmax([123, 456, 789])``: textbook formula, jsoftmax, float64 and mpmath."""
    z = jnp.asarray([123.0, 456.0, 789.0], F32)
    probs = mp_softmax([123, 456, 789])
    z64 = np.array([123.0, 456.0, 789.0])
    shifted = np.exp(z64 - z64.max())
    return {
        "logits": z,
        "naive_float32": jax.jit(naive_softmax)(z),
        "naive_float64": _naive_np64(z64),
        "jsoftmax_float32": jax.jit(jsm.softmax)(z),
        "float64_shifted": shifted / shifted.sum(),
        "mpmath": [float(p) for p in probs],
    }


def _naive_np64(z: np.ndarray) -> np.ndarray:
    """The textbook formula in float64: exp(789) overflows there too (the limit is ~709.8)."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(z)
        return e / np.sum(e)


def check_scale(scales: np.ndarray) -> dict[str, Any]:
    """Cross-entropy of ``scale · base`` (10 classes) by five formulas, against mpmath."""
    base = np.asarray([1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.0, -3.0, 1.5, -0.5], np.float32)
    label = 2  # logit 0.5: not the largest, so the loss grows like scale·(3 − 0.5)
    methods: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
        "naive softmax, then log": ce_via_naive_softmax,
        "jax.nn.softmax, then log": ce_via_stable_softmax,
        "optax (from logits)": ce_optax,
        "jsm.cross_entropy": ce_jsm,
        "jsm.fused_cross_entropy": ce_jsm_fused,
    }
    values: dict[str, list[float]] = {name: [] for name in methods}
    errors: dict[str, list[float]] = {name: [] for name in methods}
    reference = []
    for s in scales:
        z = (np.float32(s) * base).astype(np.float32)
        ref = mp_cross_entropy(z, label)
        reference.append(float(ref))
        for name, fn in methods.items():
            v = float(fn(jnp.asarray(z), jnp.asarray(label)))
            values[name].append(v)
            errors[name].append(rel_err(v, ref))
    # The first scale at which each method stops returning a finite loss, and what it returns.
    first_bad = {
        name: next(
            (
                {"scale": float(s), "value": v}
                for s, v in zip(scales, vals, strict=True)
                if not np.isfinite(v)
            ),
            None,
        )
        for name, vals in values.items()
    }
    return {
        "base_logits": base,
        "label": label,
        "scales": scales,
        "reference": reference,
        "values": values,
        "rel_errors": errors,
        "first_non_finite_scale": first_bad,
    }


def check_confident(exponents: np.ndarray) -> dict[str, Any]:
    """Logits ``[0, −t]``, label 0: the loss is ``log(1 + e^−t)``, chosen as 1e-9 ... 1e-30."""
    rows = []
    for k in exponents:
        t = np.float32(np.log(10.0) * k)  # e^-t ≈ 10^-k
        z = jnp.asarray([0.0, -t], F32)
        ref = mp_cross_entropy([0.0, -float(t)], 0)
        row = {"t": float(t), "true": float(ref)}
        for name, fn in (
            ("optax", ce_optax),
            ("jax.nn.log_softmax", ce_via_log_softmax),
            ("jsm.cross_entropy", ce_jsm),
            ("jsm.fused_cross_entropy", ce_jsm_fused),
        ):
            v = float(fn(z, jnp.asarray(0)))
            row[name] = v
            row[f"{name} rel_error"] = rel_err(v, ref)
        rows.append(row)
    return {"rows": rows}


def check_push_pull() -> dict[str, Any]:
    z = jnp.asarray([4.0, -4.0, 3.0], F32)
    label = 2
    loss, grad = jax.jit(jax.value_and_grad(ce_jsm_fused))(z, jnp.asarray(label))
    grad_ref = jax.jit(jax.grad(ce_jsm))(z, jnp.asarray(label))
    probs = np.asarray(jax.jit(jsm.softmax)(z))
    grad, grad_ref = np.asarray(grad), np.asarray(grad_ref)
    push_pull = probs - np.eye(3, dtype=np.float32)[label]
    exact_probs = mp_softmax([4, -4, 3])
    exact_grad = [p - (1 if i == label else 0) for i, p in enumerate(exact_probs)]
    return {
        "logits": z,
        "label": label,
        "loss": float(loss),
        "loss_mpmath": float(mp_cross_entropy([4, -4, 3], label)),
        "grad_fused": grad,
        "grad_autodiff": grad_ref,
        "softmax": probs,
        "softmax_minus_onehot": push_pull,
        "grad_mpmath": [float(g) for g in exact_grad],
        "max_abs_grad_vs_softmax_minus_onehot": float(np.max(np.abs(grad - push_pull))),
        "max_abs_grad_vs_mpmath": float(
            np.max(np.abs(np.asarray(grad, np.float64) - [float(g) for g in exact_grad]))
        ),
    }


@jax.jit
def _binary_pair(logits: jax.Array, labels: jax.Array, d: jax.Array):
    """Values and gradients of the 2-class softmax CE and of sigmoid BCE of ``d``."""

    def ce(lg):
        return jsm.fused_cross_entropy(lg, labels, reduction="sum")

    def bce(dd):
        return jnp.sum(optax.sigmoid_binary_cross_entropy(dd, labels.astype(dd.dtype)))

    ce_values = jsm.fused_cross_entropy(logits, labels)
    bce_values = optax.sigmoid_binary_cross_entropy(d, labels.astype(d.dtype))
    return ce_values, jax.grad(ce)(logits), bce_values, jax.grad(bce)(d)


def check_binary(num: int) -> dict[str, Any]:
    """``CE([c, c + d], y)`` against ``optax.sigmoid_binary_cross_entropy(d, y)`` and mpmath.

    With ``d = z1 − z0``, both equal ``softplus(d) − y·d``, and the gradient with respect to
    ``z1`` equals ``σ(d) − y``, the BCE gradient with respect to ``d`` (the one for ``z0`` is
    its negative).
    """
    d = np.linspace(-40.0, 40.0, num).astype(np.float32)
    out: dict[str, Any] = {"d": d}
    keys = (
        "value_abs_diff",
        "grad_abs_diff",
        "ce_value_rel_error",
        "bce_value_rel_error",
        "ce_grad_rel_error",
        "bce_grad_rel_error",
    )
    worst = dict.fromkeys(keys, 0.0)
    for shift in (0.0, 3.0):  # softmax ignores a common shift; d's grid keeps c + d exact
        z0 = np.full_like(d, shift)
        logits = jnp.asarray(np.stack([z0, z0 + d], axis=-1))
        for y in (0, 1):
            labels = jnp.asarray(np.full(d.shape, y, np.int32))
            ce_v, ce_g, bce_v, bce_g = map(np.asarray, _binary_pair(logits, labels, jnp.asarray(d)))
            ref_v, ref_g = zip(*(mp_binary(v, y) for v in d), strict=True)
            updates = {
                "value_abs_diff": float(np.max(np.abs(ce_v - bce_v))),
                "grad_abs_diff": float(np.max(np.abs(ce_g[:, 1] - bce_g))),
                "ce_value_rel_error": max(map(rel_err, map(float, ce_v), ref_v)),
                "bce_value_rel_error": max(map(rel_err, map(float, bce_v), ref_v)),
                "ce_grad_rel_error": max(
                    max(map(rel_err, map(float, ce_g[:, 1]), ref_g)),
                    max(map(rel_err, map(float, -ce_g[:, 0]), ref_g)),
                ),
                "bce_grad_rel_error": max(map(rel_err, map(float, bce_g), ref_g)),
            }
            worst = {k: max(worst[k], updates[k]) for k in keys}
            if shift == 0.0:
                out[f"ce_y{y}"] = ce_v
                out[f"bce_y{y}"] = bce_v
                out[f"ce_grad_y{y}"] = ce_g[:, 1]
                out[f"bce_grad_y{y}"] = bce_g
    out["worst"] = worst
    return out


def check_temperature(temperatures: np.ndarray) -> dict[str, Any]:
    z = jnp.asarray([1.2, 1.0, 0.2, -0.5], F32)
    ours_fn = jax.jit(lambda z, t: jsm.softmax(z / t))
    naive_fn = jax.jit(lambda z, t: naive_softmax(z / t))
    ours = np.stack([np.asarray(ours_fn(z, F32(t))) for t in temperatures])
    naive = np.stack([np.asarray(naive_fn(z, F32(t))) for t in temperatures])
    one_hot = np.eye(z.shape[0])[int(np.argmax(np.asarray(z)))]
    return {
        "logits": z,
        "temperatures": temperatures,
        "jsoftmax": ours,
        "naive": naive,
        "l1_to_onehot": np.abs(ours - one_hot[None, :]).sum(axis=1),
        "naive_nan_below_T": float(
            max(
                (
                    t
                    for t, row in zip(temperatures, naive, strict=True)
                    if not np.all(np.isfinite(row))
                ),
                default=0.0,
            )
        ),
    }


# --- report -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reproduce the classic softmax / cross-entropy failures in float32 and "
        "show that jsoftmax does not have them (references: mpmath, float64)."
    )
    parser.add_argument("--out", metavar="DIR", help="results folder (default experiments/results)")
    parser.add_argument("--quick", action="store_true", help="fewer grid points, for tests")
    return parser.parse_args(argv)


def fmt(x: Any) -> str:
    arr = np.atleast_1d(np.asarray(x, np.float64))
    return "[" + ", ".join(f"{v:.8g}" for v in arr) + "]" if arr.size > 1 else f"{arr[0]:.8g}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out = _common.results_dir(args.out)
    n_scale = 9 if args.quick else 41
    result: dict[str, Any] = {
        "device": str(jax.devices()[0]),
        "overflow": check_overflow(),
        "scale": check_scale(np.logspace(0, 4, n_scale)),
        "confident": check_confident(np.arange(9, 31, 3 if args.quick else 1)),
        "push_pull": check_push_pull(),
        "binary": check_binary(41 if args.quick else 161),
        "temperature": check_temperature(np.logspace(-3, 1, 21 if args.quick else 81)),
    }
    result["summary"] = summarize(result)
    png = plot(out / "stability.png", result)
    result["png"] = str(png)
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_path = _common.write_json(out / "stability.json", result)
    print_report(result)
    print(f"wrote {json_path}, {png}")
    return result


def summarize(r: dict[str, Any]) -> list[dict[str, str]]:
    """One row per claim: the exact value, the failing formula, jsoftmax, and the verdict."""
    ov, sc, cf, pp, bi = r["overflow"], r["scale"], r["confident"], r["push_pull"], r["binary"]
    ours_ok = bool(np.array_equal(np.asarray(ov["jsoftmax_float32"]), [0.0, 0.0, 1.0]))
    worst_jsm_scale = max(
        max(sc["rel_errors"]["jsm.cross_entropy"]), max(sc["rel_errors"]["jsm.fused_cross_entropy"])
    )
    worst_conf = max(
        max(row["jsm.cross_entropy rel_error"], row["jsm.fused_cross_entropy rel_error"])
        for row in cf["rows"]
    )
    optax_conf = [row["optax"] for row in cf["rows"]]
    eps = float(np.finfo(np.float32).eps)
    bw = bi["worst"]
    naive, stable = "naive softmax, then log", "jax.nn.softmax, then log"
    return [
        {
            "check": "softmax([123, 456, 789])",
            "exact": fmt(ov["mpmath"]),
            "textbook": "exp/Σexp: " + fmt(ov["naive_float32"]),
            "jsoftmax": fmt(ov["jsoftmax_float32"]),
            "ok": str(ours_ok),
        },
        {
            "check": "CE as logits scale 1 → 1e4 (rel. error)",
            "exact": "mpmath",
            "textbook": "; ".join(
                f"{label}: {bad['value']} at s≥{bad['scale']:.3g}"
                for label, bad in (
                    ("exp/Σexp→log", sc["first_non_finite_scale"][naive]),
                    ("softmax→log", sc["first_non_finite_scale"][stable]),
                )
                if bad is not None
            ),
            "jsoftmax": f"worst {worst_jsm_scale:.1e}",
            "ok": str(worst_jsm_scale < 4 * eps),
        },
        {
            "check": "confident loss 1e-9 … 1e-30 (rel. error)",
            "exact": "mpmath",
            "textbook": f"optax: {fmt(sorted(set(optax_conf)))} (rel. error 1)",
            "jsoftmax": f"worst {worst_conf:.1e}",
            "ok": str(worst_conf < 4 * eps),
        },
        {
            "check": "push-pull loss, z=[4,−4,3], y=2",
            "exact": fmt(pp["loss_mpmath"]),
            "textbook": "",
            "jsoftmax": fmt(pp["loss"]),
            "ok": str(abs(pp["loss"] - pp["loss_mpmath"]) < 4 * eps * pp["loss_mpmath"]),
        },
        {
            "check": "push-pull gradient = softmax − onehot",
            "exact": fmt(pp["grad_mpmath"]),
            "textbook": "",
            "jsoftmax": fmt(pp["grad_fused"]),
            "ok": str(pp["max_abs_grad_vs_mpmath"] < 4 * eps),
        },
        {
            "check": "2-class CE = sigmoid BCE(z1 − z0) (rel. error)",
            "exact": "mpmath",
            "textbook": f"optax BCE: value {bw['bce_value_rel_error']:.1e}, "
            f"grad {bw['bce_grad_rel_error']:.1e}",
            "jsoftmax": f"value {bw['ce_value_rel_error']:.1e}, grad {bw['ce_grad_rel_error']:.1e}",
            "ok": str(bw["ce_value_rel_error"] < 4 * eps and bw["ce_grad_rel_error"] < 4 * eps),
        },
        {
            "check": "softmax(z/T) at T=1e-3",
            "exact": "one-hot [1, 0, 0, 0]",
            "textbook": "exp/Σexp: " + fmt(r["temperature"]["naive"][0]),
            "jsoftmax": fmt(r["temperature"]["jsoftmax"][0]),
            "ok": str(bool(np.array_equal(r["temperature"]["jsoftmax"][0], [1.0, 0.0, 0.0, 0.0]))),
        },
    ]


def print_report(r: dict[str, Any]) -> None:
    ov, sc, cf, pp = r["overflow"], r["scale"], r["confident"], r["push_pull"]
    print("1. softmax([123, 456, 789]) in float32")
    print(f"   exact (mpmath):                 {fmt(ov['mpmath'])}")
    print(f"   float64, shifted by the max:    {fmt(ov['float64_shifted'])}")
    print(f"   textbook exp/Σexp, float32:     {fmt(ov['naive_float32'])}")
    print(f"   textbook exp/Σexp, float64:     {fmt(ov['naive_float64'])}")
    print(f"   jsm.softmax, float32:           {fmt(ov['jsoftmax_float32'])}")
    print(
        f"2. cross-entropy, logits = scale x {fmt(sc['base_logits'])}, label {sc['label']}; "
        "relative error vs mpmath"
    )
    header = "".join(f"{name:>26}" for name in sc["values"])
    print(f"   {'scale':>8}{'exact':>14}{header}")
    picks = sorted(
        {
            0,
            len(sc["scales"]) // 4,
            len(sc["scales"]) // 2,
            3 * len(sc["scales"]) // 4,
            len(sc["scales"]) - 1,
        }
        | {int(np.argmax(np.asarray(sc["scales"]) >= 100))}
    )
    for i in picks:
        errs = "".join(f"{sc['rel_errors'][name][i]:>26.1e}" for name in sc["values"])
        print(f"   {sc['scales'][i]:>8.3g}{sc['reference'][i]:>14.6g}{errs}")
    print("3. confident prediction: logits [0, -t], label 0; loss = log(1 + e^-t)")
    names = ["optax", "jax.nn.log_softmax", "jsm.cross_entropy", "jsm.fused_cross_entropy"]
    print(f"   {'t':>8}{'exact':>12}" + "".join(f"{n:>25}" for n in names))
    for row in cf["rows"][:: max(1, len(cf["rows"]) // 8)]:
        cells = "".join(f"{row[n]:>12.3e} ({row[n + ' rel_error']:7.1e})" for n in names)
        print(f"   {row['t']:>8.3f}{row['true']:>12.4e}{cells}")
    print("   (value, and relative error in parentheses)")
    print("4. push all, pull one: logits [4, -4, 3], label 2")
    print(f"   loss            {fmt(pp['loss'])}   (mpmath {fmt(pp['loss_mpmath'])})")
    print(f"   gradient        {fmt(pp['grad_fused'])}")
    print(f"   softmax(z)      {fmt(pp['softmax'])}")
    print(
        f"   softmax - e_2   {fmt(pp['softmax_minus_onehot'])}   "
        f"(max |difference| {pp['max_abs_grad_vs_softmax_minus_onehot']:.1e})"
    )
    print(f"   mpmath          {fmt(pp['grad_mpmath'])}")
    w = r["binary"]["worst"]
    print("5. two classes, logits [c, c + d], d in [-40, 40], c in {0, 3}, labels 0 and 1:")
    print(
        f"   max |jsm CE - optax BCE(d)|: value {w['value_abs_diff']:.1e}, gradient "
        f"{w['grad_abs_diff']:.1e}"
    )
    print(
        f"   relative error vs mpmath: jsm CE value {w['ce_value_rel_error']:.1e}, gradient "
        f"{w['ce_grad_rel_error']:.1e}; optax BCE value {w['bce_value_rel_error']:.1e}, "
        f"gradient {w['bce_grad_rel_error']:.1e}"
    )
    t = r["temperature"]
    print(f"6. temperature: softmax({fmt(t['logits'])} / T)")
    for i in (len(t["temperatures"]) - 1, len(t["temperatures"]) // 2, 0):
        print(
            f"   T={t['temperatures'][i]:<8.3g} jsm {fmt(t['jsoftmax'][i])}   "
            f"exp/Σexp {fmt(t['naive'][i])}"
        )
    print(f"   textbook exp/Σexp gives NaN for T <= {t['naive_nan_below_T']:.3g}")
    print()
    rows = r["summary"]
    widths = {k: max(len(k), *(len(row[k]) for row in rows)) for k in rows[0]}
    widths = {k: min(v, 58) for k, v in widths.items()}
    print("  ".join(f"{k:<{widths[k]}}" for k in rows[0]))
    print("  ".join("-" * widths[k] for k in rows[0]))
    for row in rows:
        print("  ".join(f"{row[k][: widths[k]]:<{widths[k]}}" for k in row))


def plot(path: Path, r: dict[str, Any]) -> Path:
    plt = _common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    floor, ceiling = 1e-10, 1e2

    def clip(errors):
        e = np.asarray(errors, np.float64)
        return np.where(np.isfinite(e), np.maximum(e, floor), ceiling)

    # 1. overflow table
    ax = axes[0, 0]
    ax.axis("off")
    ov = r["overflow"]
    cells = [
        [f"{p:.2e}" if 0 < p < 1e-3 else f"{p:.3g}" for p in ov["mpmath"]],
        [f"{p:.3g}" for p in np.asarray(ov["naive_float32"])],
        [f"{p:.3g}" for p in np.asarray(ov["naive_float64"])],
        [f"{p:.3g}" for p in np.asarray(ov["jsoftmax_float32"])],
    ]
    table = ax.table(
        cellText=cells,
        colLabels=["z = 123", "z = 456", "z = 789"],
        rowLabels=["exact (mpmath)", "exp/Σexp float32", "exp/Σexp float64", "jsm.softmax float32"],
        loc="center",
        cellLoc="center",
    )
    table.scale(1, 2.0)
    table.set_fontsize(10)
    ax.set_title(
        "1. softmax([123, 456, 789]): the textbook formula overflows\n"
        "(0 in float32 is the correctly rounded 5.75e-290 and 2.40e-145)"
    )

    # 2. cross-entropy error vs scale
    ax = axes[0, 1]
    sc = r["scale"]
    styles = {
        "naive softmax, then log": ("tab:red", "x", "-"),
        "jax.nn.softmax, then log": ("tab:orange", "+", "-"),
        "optax (from logits)": ("tab:green", "s", ":"),
        "jsm.cross_entropy": ("tab:blue", "o", "-"),
        "jsm.fused_cross_entropy": ("tab:purple", ".", "--"),
    }
    for name, errs in sc["rel_errors"].items():
        color, marker, ls = styles[name]
        ax.plot(sc["scales"], clip(errs), ls=ls, marker=marker, color=color, ms=4, label=name)
    ax.axhline(np.finfo(np.float32).eps, color="0.3", ls=":", lw=1)
    ax.text(1.1, np.finfo(np.float32).eps * 1.5, "float32 epsilon", fontsize=8, color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, ceiling * 5)
    ax.set_yticks(
        [1e-10, 1e-8, 1e-6, 1e-4, 1e-2, ceiling],
        ["≤1e-10", "1e-8", "1e-6", "1e-4", "1e-2", "inf/NaN"],
    )
    ax.set_xlabel("logit scale s (logits = s · fixed vector of 10)")
    ax.set_ylabel("relative error of the loss vs mpmath")
    ax.set_title("2. Cross-entropy from probabilities vs from logits")
    ax.legend(fontsize=8, loc="center left")

    # 3. confident prediction
    ax = axes[0, 2]
    rows = r["confident"]["rows"]
    true = [row["true"] for row in rows]
    for name, color, marker in (
        ("optax", "tab:green", "s"),
        ("jax.nn.log_softmax", "tab:orange", "+"),
        ("jsm.cross_entropy", "tab:blue", "o"),
        ("jsm.fused_cross_entropy", "tab:purple", "."),
    ):
        ax.plot(
            true,
            clip([row[f"{name} rel_error"] for row in rows]),
            marker=marker,
            color=color,
            ms=5,
            label=name + (" (returns 0.0)" if name == "optax" else ""),
        )
    ax.axhline(np.finfo(np.float32).eps, color="0.3", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, ceiling * 5)
    ax.set_yticks(
        [1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1],
        ["≤1e-10", "1e-8", "1e-6", "1e-4", "1e-2", "1 (all lost)"],
    )
    ax.invert_xaxis()
    ax.set_xlabel("true loss log(1 + e^−t) (nats), logits [0, −t], label 0")
    ax.set_ylabel("relative error vs mpmath")
    ax.set_title("3. Loss of a confident, correct prediction")
    ax.legend(fontsize=8, loc="center left")

    # 4. push all, pull one
    ax = axes[1, 0]
    pp = r["push_pull"]
    x = np.arange(3)
    probs = np.asarray(pp["softmax"])
    grad = np.asarray(pp["grad_fused"])
    ax.bar(x - 0.2, probs, 0.4, label="softmax(z): pushes every class up", color="tab:blue")
    ax.bar(x + 0.2, grad, 0.4, label="gradient = softmax(z) − onehot(2)", color="tab:red")
    for xi, g in zip(x, grad, strict=True):
        ax.annotate(
            f"{g:.8g}", (xi + 0.2, g), ha="center", va="bottom" if g >= 0 else "top", fontsize=8
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(
        x,
        [
            f"class {i}\nz = {v:g}" + ("\n(label)" if i == pp["label"] else "")
            for i, v in enumerate(np.asarray(pp["logits"]))
        ],
    )
    ax.set_ylim(-1.0, 1.0)
    ax.set_ylabel("value (dimensionless)")
    ax.set_title(f"4. Push all, pull one: loss {pp['loss']:.8g} (mpmath {pp['loss_mpmath']:.8g})")
    ax.legend(fontsize=8, loc="lower left")

    # 5. binary
    ax = axes[1, 1]
    b = r["binary"]
    for y, color in ((0, "tab:blue"), (1, "tab:red")):
        ax.plot(
            b["d"],
            np.asarray(b[f"bce_y{y}"]),
            color=color,
            lw=4,
            alpha=0.35,
            label=f"optax sigmoid BCE(d), label {y}",
        )
        ax.plot(
            b["d"],
            np.asarray(b[f"ce_y{y}"]),
            color=color,
            lw=1,
            ls="--",
            label=f"jsm CE([0, d]), label {y}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("logit difference d = z1 − z0")
    ax.set_ylabel("loss (nats, log scale)")
    w = b["worst"]
    ax.set_title(
        "5. Two classes: softmax CE = sigmoid BCE of d = z1 − z0\n"
        f"rel. error vs mpmath, value / gradient: jsm {w['ce_value_rel_error']:.0e} / "
        f"{w['ce_grad_rel_error']:.0e}, optax {w['bce_value_rel_error']:.0e} / "
        f"{w['bce_grad_rel_error']:.0e}"
    )
    ax.legend(fontsize=8)

    # 6. temperature
    ax = axes[1, 2]
    t = r["temperature"]
    temps = np.asarray(t["temperatures"])
    for k, z in enumerate(np.asarray(t["logits"])):
        ax.plot(temps, t["jsoftmax"][:, k], lw=1.8, label=f"class {k} (z = {z:g})")
    if t["naive_nan_below_T"] > 0:
        ax.axvspan(
            temps[0],
            t["naive_nan_below_T"],
            color="tab:red",
            alpha=0.12,
            label="textbook exp/Σexp gives NaN",
        )
    ax.set_xscale("log")
    ax.set_xlabel("temperature T (log scale)")
    ax.set_ylabel("jsm.softmax(z / T)  (probability)")
    ax.set_title("6. Temperature: softmax(z/T) → one-hot argmax as T → 0")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(0.0, 0.62))

    fig.suptitle(
        "Classic float32 failures of softmax and cross-entropy, and jsoftmax "
        f"on the same inputs ({r['device']}; references: mpmath, 60 digits)"
    )
    return _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
