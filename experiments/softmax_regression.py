"""The classic linear softmax classifier, ``loss, dW = softmax_loss(W, X, y, reg)``, three ways.

1. NumPy with explicit loops over examples and classes.
2. Vectorized NumPy with the closed-form gradient ``dW = Xᵀ(a − Y)/N + reg·W``, where
   ``a = softmax(XW)`` row by row and ``Y`` is the one-hot matrix of the labels.
3. ``jsm.fused_cross_entropy`` differentiated by ``jax.grad``.

The loss is the mean cross-entropy plus ``reg/2·‖W‖²``. The script checks that the three agree
with each other and with a central-difference gradient (in float64), times them, and trains the
classifier by full-batch gradient descent on scikit-learn's digits. The bias is folded into
``W`` by appending a constant-1 feature to ``X``.

Example::

    python experiments/softmax_regression.py
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
import numpy as np
import optax
from tqdm import tqdm

import jsoftmax as jsm

LossAndGrad = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[float, np.ndarray]]


def softmax_loss_loops(W: np.ndarray, X: np.ndarray, y: np.ndarray, reg: float):
    """Softmax loss and gradient with explicit loops over examples and classes.

    Args:
      W: weights, shape [D, C].
      X: inputs, shape [N, D].
      y: integer labels in [0, C), shape [N].
      reg: L2 strength; the loss includes ``reg/2·‖W‖²``.

    Returns:
      ``(loss, dW)``: a float and an array of shape [D, C].
    """
    num_examples = X.shape[0]
    num_classes = W.shape[1]
    loss = 0.0
    dW = np.zeros_like(W)
    for i in range(num_examples):
        scores = X[i] @ W
        scores = scores - np.max(scores)  # shift by the max: exp never overflows, same softmax
        exp_scores = np.exp(scores)
        total = np.sum(exp_scores)
        loss += np.log(total) - scores[y[i]]  # −log a_y = log Σ exp − z_y
        for j in range(num_classes):
            a_j = exp_scores[j] / total
            dW[:, j] += (a_j - (j == y[i])) * X[i]
    loss = loss / num_examples + 0.5 * reg * np.sum(W * W)
    dW = dW / num_examples + reg * W
    return float(loss), dW


def softmax_loss_vectorized(W: np.ndarray, X: np.ndarray, y: np.ndarray, reg: float):
    """Softmax loss and gradient as matrix products: ``dW = Xᵀ(a − Y)/N + reg·W``.

    Same arguments and results as :func:`softmax_loss_loops`.
    """
    num_examples = X.shape[0]
    scores = X @ W
    scores = scores - np.max(scores, axis=1, keepdims=True)
    log_a = scores - np.log(np.sum(np.exp(scores), axis=1, keepdims=True))
    a = np.exp(log_a)
    loss = -np.mean(log_a[np.arange(num_examples), y]) + 0.5 * reg * np.sum(W * W)
    one_hot = np.zeros_like(a)
    one_hot[np.arange(num_examples), y] = 1.0
    dW = X.T @ (a - one_hot) / num_examples + reg * W
    return float(loss), dW


def _objective(W: jax.Array, X: jax.Array, y: jax.Array, reg: float) -> jax.Array:
    data = jsm.fused_cross_entropy(X @ W, y, reduction="mean")
    return data + 0.5 * reg * jnp.sum(W * W)


_value_and_grad = jax.jit(jax.value_and_grad(_objective))


def _optax_objective(W: jax.Array, X: jax.Array, y: jax.Array, reg: float) -> jax.Array:
    data = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(X @ W, y))
    return data + 0.5 * reg * jnp.sum(W * W)


# The same classifier with optax's loss: a peer for the timing only.
_optax_value_and_grad = jax.jit(jax.value_and_grad(_optax_objective))


def softmax_loss_jsoftmax(W, X, y, reg: float):
    """Softmax loss from ``jsm.fused_cross_entropy``, gradient from ``jax.grad``.

    Same arguments as :func:`softmax_loss_loops`; computes in the dtype of ``W`` and ``X``
    (float32 unless x64 is enabled). Returns JAX arrays ``(loss, dW)``.
    """
    return _value_and_grad(W, X, y, reg)


def numerical_gradient(f: Callable[[np.ndarray], float], W: np.ndarray, h: float = 1e-5):
    """Central differences ``(f(W + h·e_k) − f(W − h·e_k)) / 2h`` for every entry, in float64."""
    W = W.astype(np.float64).copy()
    grad = np.zeros_like(W)
    for k in np.ndindex(W.shape):
        old = W[k]
        W[k] = old + h
        plus = f(W)
        W[k] = old - h
        minus = f(W)
        W[k] = old
        grad[k] = (plus - minus) / (2 * h)
    return grad


def rel_error(a: np.ndarray, reference: np.ndarray) -> float:
    """Normwise relative error ``max |a − ref| / max |ref|``.

    Entries of dW that are nearly 0 would make an elementwise ratio measure the noise of the
    finite differences rather than the gradient; scaling by the largest entry does not.
    """
    a, reference = np.asarray(a, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(a - reference)) / np.max(np.abs(reference)))


def add_bias_feature(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((x.shape[0], 1), x.dtype)], axis=1)


def accuracy(W: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(X @ W, axis=1) == y))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Linear softmax classifier three ways (loops, vectorized NumPy, "
        "jsoftmax + jax.grad): gradient check, timing and training on the digits."
    )
    parser.add_argument("--reg", type=float, default=1e-3, help="L2 strength (loss has reg/2·‖W‖²)")
    parser.add_argument("--lr", type=float, default=0.5, help="gradient-descent step size")
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="full-batch gradient-descent steps (default 300, 40 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--out", metavar="DIR", help="results folder (default experiments/results)")
    parser.add_argument("--quick", action="store_true", help="small, fast run for tests")
    args = parser.parse_args(argv)
    if args.iterations is None:
        args.iterations = 40 if args.quick else 300
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if args.reg < 0:
        parser.error("--reg must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out = _common.results_dir(args.out)
    x_train, y_train, x_test, y_test = _common.digits_split(args.split_seed)
    x_train, x_test = add_bias_feature(x_train), add_bias_feature(x_test)
    num_features, num_classes = x_train.shape[1], 10
    rng = np.random.default_rng(args.seed)

    # --- 1. agreement at a random W, on the whole training set --------------------------------
    n_check = len(x_train)
    X = x_train.astype(np.float64)
    y = y_train
    W = 0.1 * rng.standard_normal((num_features, num_classes))
    reg = args.reg if args.reg > 0 else 1e-3  # a nonzero reg also exercises that term
    versions: dict[str, LossAndGrad] = {
        "numpy loops": softmax_loss_loops,
        "numpy vectorized": softmax_loss_vectorized,
    }

    def jsoftmax_in(dtype) -> LossAndGrad:
        def run(W, X, y, reg):
            loss, dW = softmax_loss_jsoftmax(
                jnp.asarray(W, dtype), jnp.asarray(X, dtype), jnp.asarray(y), reg
            )
            return float(loss), np.asarray(dW, np.float64)

        return run

    versions["jsoftmax float32"] = jsoftmax_in(jnp.float32)
    numerical = numerical_gradient(lambda w: softmax_loss_vectorized(w, X, y, reg)[0], W)
    ref_loss, ref_dW = softmax_loss_vectorized(W, X, y, reg)
    agreement: dict[str, dict[str, float]] = {}
    for name, fn in versions.items():
        loss, dW = fn(W, X, y, reg)
        agreement[name] = {
            "loss": loss,
            "loss_abs_diff_vs_vectorized": abs(loss - ref_loss),
            "dW_rel_error_vs_numerical": rel_error(dW, numerical),
            "dW_max_abs_diff_vs_vectorized": float(np.max(np.abs(dW - ref_dW))),
        }
    # The same jsoftmax code in float64, to show the float32 differences are only rounding.
    with jax.enable_x64(True):
        loss, dW = jsoftmax_in(jnp.float64)(W, X, y, reg)
    agreement["jsoftmax float64"] = {
        "loss": loss,
        "loss_abs_diff_vs_vectorized": abs(loss - ref_loss),
        "dW_rel_error_vs_numerical": rel_error(dW, numerical),
        "dW_max_abs_diff_vs_vectorized": float(np.max(np.abs(dW - ref_dW))),
    }
    versions_all = list(agreement)

    # --- 2. timing on the whole training set ------------------------------------------------
    Xt64 = x_train.astype(np.float64)
    Xt32 = jnp.asarray(x_train, jnp.float32)
    yt = jnp.asarray(y_train)
    W0 = 1e-3 * rng.standard_normal((num_features, num_classes))
    W0_32 = jnp.asarray(W0, jnp.float32)
    timed = {
        "numpy loops": (lambda: softmax_loss_loops(W0, Xt64, y_train, reg), 2 if args.quick else 7),
        "numpy vectorized": (lambda: softmax_loss_vectorized(W0, Xt64, y_train, reg), 50),
        "jsoftmax float32": (
            lambda: jax.block_until_ready(softmax_loss_jsoftmax(W0_32, Xt32, yt, reg)),
            50 if args.quick else 500,
        ),
        "optax float32": (
            lambda: jax.block_until_ready(_optax_value_and_grad(W0_32, Xt32, yt, reg)),
            50 if args.quick else 500,
        ),
    }
    seconds = {}
    for name, (fn, repeats) in tqdm(timed.items(), desc="timing", unit="version"):
        seconds[name] = _common.median_seconds(fn, repeats=repeats, warmup=1)

    # --- 3. training: the same gradient descent with vectorized NumPy and with jsoftmax -----
    trainers: dict[str, Callable[[np.ndarray], tuple[float, np.ndarray]]] = {
        "numpy vectorized": lambda w: softmax_loss_vectorized(w, Xt64, y_train, args.reg),
        "jsoftmax float32": lambda w: softmax_loss_jsoftmax(w, Xt32, yt, args.reg),
    }
    history: dict[str, list[float]] = {name: [] for name in trainers}
    test_accuracy_curve: dict[str, list[float]] = {name: [] for name in trainers}
    final: dict[str, Any] = {}
    for name, loss_and_grad in trainers.items():
        w = W0.copy() if name.startswith("numpy") else W0_32
        for _ in tqdm(range(args.iterations), desc=f"training ({name})", unit="step"):
            loss, dW = loss_and_grad(w)
            history[name].append(float(loss))
            test_accuracy_curve[name].append(accuracy(np.asarray(w), x_test, y_test))
            w = w - args.lr * dW
        w = np.asarray(w)
        final[name] = {
            "train_loss": softmax_loss_vectorized(w.astype(np.float64), Xt64, y_train, args.reg)[0],
            "train_accuracy": accuracy(w, x_train, y_train),
            "test_accuracy": accuracy(w, x_test, y_test),
        }
    curve_diff = float(np.max(np.abs(np.subtract(*history.values()))))

    result: dict[str, Any] = {
        "config": {
            **vars(args),
            "check_examples": n_check,
            "check_reg": reg,
            "features_with_bias": num_features,
            "classes": num_classes,
            "train_examples": len(x_train),
            "test_examples": len(x_test),
        },
        "device": str(jax.devices()[0]),
        "agreement": agreement,
        "median_seconds": seconds,
        "training": final,
        "training_loss": history,
        "training_test_accuracy": test_accuracy_curve,
        "training_max_abs_loss_difference": curve_diff,
    }
    png = plot(out / "softmax_regression.png", result, versions_all)
    result["png"] = str(png)
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_path = _common.write_json(out / "softmax_regression.json", result)

    print(
        f"agreement at a random W ({n_check} training examples, reg={reg:g}); |Δ| against "
        "vectorized NumPy, relative error max|dW - num|/max|num| against float64 central "
        "differences:"
    )
    print(
        f"  {'version':<18} {'loss':>12} {'|Δloss|':>10} {'dW rel. error vs numerical':>27} "
        f"{'max |ΔdW|':>10}"
    )
    for name, row in agreement.items():
        print(
            f"  {name:<18} {row['loss']:12.8f} {row['loss_abs_diff_vs_vectorized']:10.1e} "
            f"{row['dW_rel_error_vs_numerical']:27.1e} "
            f"{row['dW_max_abs_diff_vs_vectorized']:10.1e}"
        )
    print(
        f"median time of one loss-and-gradient call ({len(x_train)} examples x "
        f"{num_features} features x {num_classes} classes, {result['device']}):"
    )
    for name, s in seconds.items():
        print(
            f"  {name:<18} {1e6 * s:12.1f} us  ({s / seconds['jsoftmax float32']:8.1f}x jsoftmax)"
        )
    print(
        f"training: {args.iterations} full-batch gradient-descent steps, lr={args.lr:g}, "
        f"reg={args.reg:g}; largest loss-curve difference {curve_diff:.1e}"
    )
    for name, row in final.items():
        print(
            f"  {name:<18} train accuracy {row['train_accuracy']:.3f}, "
            f"test accuracy {row['test_accuracy']:.3f}"
        )
    print(f"wrote {json_path}, {png}")
    return result


def plot(path: Path, result: dict[str, Any], versions: list[str]) -> Path:
    plt = _common.pyplot()
    fig, (ax_check, ax_time, ax_train) = plt.subplots(1, 3, figsize=(16.5, 4.8))
    colors = {
        "numpy loops": "tab:gray",
        "numpy vectorized": "tab:green",
        "jsoftmax float32": "tab:blue",
        "jsoftmax float64": "tab:purple",
        "optax float32": "tab:orange",
    }

    def tick(name: str) -> str:
        if name.startswith("numpy"):
            name += " float64"
        return name.replace(" ", "\n")

    errors = [result["agreement"][v]["dW_rel_error_vs_numerical"] for v in versions]
    bars = ax_check.bar(range(len(versions)), errors, color=[colors[v] for v in versions])
    ax_check.bar_label(bars, labels=[f"{e:.1e}" for e in errors], fontsize=8)
    ax_check.set_xticks(range(len(versions)), [tick(v) for v in versions])
    ax_check.axhline(
        np.finfo(np.float32).eps, color="0.3", ls=":", label="float32 machine epsilon, 1.19e-7"
    )
    ax_check.legend(loc="upper left")
    ax_check.set_yscale("log")
    ax_check.set_ylim(min(errors) / 10, 1e-2)
    ax_check.set_ylabel("max |dW − numerical| / max |numerical|\n(central differences, log scale)")
    cfg = result["config"]
    ax_check.set_title(
        f"Gradient check ({cfg['check_examples']} examples, random W)\n"
        "float64 bars: the error of the finite differences"
    )

    timed = list(result["median_seconds"])
    micros = [1e6 * result["median_seconds"][v] for v in timed]
    bars = ax_time.bar(range(len(timed)), micros, color=[colors[v] for v in timed])
    ax_time.bar_label(bars, labels=[f"{m:,.0f} µs" for m in micros], fontsize=8)
    ax_time.set_xticks(
        range(len(timed)), [tick(v) + ("\n+ jax.grad" if "32" in v else "") for v in timed]
    )
    ax_time.set_yscale("log")
    ax_time.set_ylim(min(micros) / 3, max(micros) * 5)
    ax_time.set_ylabel("median time per loss + gradient call (µs, log scale)")
    ax_time.set_title(
        f"Time per call (N={cfg['train_examples']}, D={cfg['features_with_bias']}, "
        f"C={cfg['classes']}, {result['device']})\noptax: the same JAX program with optax's loss"
    )

    for name, losses in result["training_loss"].items():
        style = {"lw": 3.5, "alpha": 0.5} if name.startswith("numpy") else {"lw": 1.0}
        acc = result["training"][name]["test_accuracy"]
        ax_train.plot(
            np.arange(len(losses)),
            losses,
            color=colors[name],
            label=f"{name} (test accuracy {100 * acc:.1f}%)",
            **style,
        )
    ax_train.set_yscale("log")
    ax_train.set_xlabel("gradient-descent step (full batch)")
    ax_train.set_ylabel("cross-entropy + reg/2·‖W‖² (nats, log scale)")
    ax_train.set_title(
        f"Training on digits (lr={cfg['lr']:g}, reg={cfg['reg']:g}):\nthe two curves coincide "
        f"(largest difference {result['training_max_abs_loss_difference']:.0e})"
    )
    ax_train.legend()
    fig.suptitle(
        "Linear softmax classifier: loops vs vectorized NumPy vs "
        "jsoftmax.fused_cross_entropy + jax.grad"
    )
    return _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
