"""Train an MLP on scikit-learn's digits with optax and ``jsm.fused_cross_entropy``.

The model is trained twice from the same seed on the same mini-batches: once with
``jsoftmax.fused_cross_entropy`` and once with optax's
``softmax_cross_entropy_with_integer_labels``. With label smoothing ε > 0 the optax loss gets
the same smoothing through the identity that cross-entropy is linear in its target,

    CE(z, (1 - ε)·onehot(y) + ε/C) = (1 - ε)·CE(z, y) + ε·CE(z, uniform),

where the uniform term is ``optax.softmax_cross_entropy(z, full(1/C))``. The script reports the
largest difference between the two loss trajectories and the median time of one training step
of each, writes the curves to PNG and the run to JSON, and prints ``test accuracy: 0.xxx`` as its
last line.

Examples::

    python experiments/train_digits.py
    python experiments/train_digits.py --label-smoothing 0.1 --save params.npz
    python experiments/train_digits.py --load params.npz --epochs 0
"""

from __future__ import annotations

import argparse
import os
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

Params = dict[str, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

NUM_FEATURES = 64
NUM_CLASSES = 10


def init_params(seed: int, hidden: Sequence[int]) -> Params:
    """He-normal weights and zero biases for a ``64 -> hidden... -> 10`` ReLU MLP.

    Parameters are named ``w0, b0, w1, b1, ...`` so that they map one-to-one onto ``.npz`` keys.
    They are drawn with NumPy's generator: the same on every backend, and nothing to compile.
    """
    rng = np.random.default_rng(seed)
    sizes = [NUM_FEATURES, *hidden, NUM_CLASSES]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        params[f"w{i}"] = jnp.asarray(w, jnp.float32)
        params[f"b{i}"] = jnp.zeros((fan_out,), jnp.float32)
    return params


def num_layers(params: Params) -> int:
    return len(params) // 2


def forward(params: Params, x: jax.Array) -> jax.Array:
    """Logits ``[N, 10]`` for inputs ``x [N, 64]``."""
    n = num_layers(params)
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def jsoftmax_loss(label_smoothing: float) -> LossFn:
    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return jsm.fused_cross_entropy(
            logits, labels, label_smoothing=label_smoothing, reduction="mean"
        )

    return loss


def optax_loss(label_smoothing: float) -> LossFn:
    def loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        if label_smoothing:
            # Cross-entropy is linear in the target, so smoothing splits into two terms.
            uniform = jnp.full_like(logits, 1.0 / logits.shape[-1])
            ce = (1.0 - label_smoothing) * ce + label_smoothing * optax.softmax_cross_entropy(
                logits, uniform
            )
        return jnp.mean(ce)

    return loss


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation):
    """One jitted optimizer step: ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""

    @jax.jit
    def step(params, opt_state, x, y):
        def objective(p):
            return loss_fn(forward(p, x), y)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_same_input_check(loss_a: LossFn, loss_b: LossFn):
    """Both losses and gradients on the same parameters and batch.

    Returns a jitted ``(params, x, y) -> (|loss_a - loss_b|, max |grad_a - grad_b|, max |grad_a|)``:
    the pure round-off difference between the two formulations, with no training in between.
    """

    @jax.jit
    def check(params, x, y):
        va, ga = jax.value_and_grad(lambda p: loss_a(forward(p, x), y))(params)
        vb, gb = jax.value_and_grad(lambda p: loss_b(forward(p, x), y))(params)
        grad_diff = jnp.max(jnp.stack([jnp.max(jnp.abs(ga[k] - gb[k])) for k in ga]))
        grad_size = jnp.max(jnp.stack([jnp.max(jnp.abs(ga[k])) for k in ga]))
        return jnp.abs(va - vb), grad_diff, grad_size

    return check


@jax.jit
def evaluate(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy (nats, no smoothing) and accuracy of ``params`` on ``(x, y)``."""
    logits = forward(params, x)
    loss = jsm.fused_cross_entropy(logits, y, reduction="mean")
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, accuracy


def save_params(path: str | os.PathLike[str], params: Params) -> Path:
    """Writes the parameters to ``path`` as ``.npz``, atomically."""
    return _common.save_npz(path, {k: np.asarray(v) for k, v in params.items()})


def load_params(path: str | os.PathLike[str]) -> Params:
    """Reads parameters saved by :func:`save_params` and checks that they form a 64 -> 10 MLP."""
    arrays = _common.load_npz(path)
    n = len(arrays) // 2
    expected = {f"{p}{i}" for i in range(n) for p in ("w", "b")}
    if n == 0 or set(arrays) != expected:
        raise ValueError(
            f"--load: {path} holds {sorted(arrays)}, expected keys w0, b0, w1, b1, ..."
        )
    fan_in = NUM_FEATURES
    for i in range(n):
        w, b = arrays[f"w{i}"], arrays[f"b{i}"]
        if w.ndim != 2 or w.shape[0] != fan_in or b.shape != (w.shape[1],):
            raise ValueError(
                f"--load: layer {i} has w{w.shape} b{b.shape}; expected w({fan_in}, k) and b(k,)"
            )
        if not np.issubdtype(w.dtype, np.floating) or not np.issubdtype(b.dtype, np.floating):
            raise ValueError(f"--load: layer {i} is not floating point ({w.dtype}, {b.dtype})")
        fan_in = w.shape[1]
    if fan_in != NUM_CLASSES:
        raise ValueError(f"--load: the last layer has {fan_in} outputs, expected {NUM_CLASSES}")
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an MLP on the scikit-learn digits with optax and "
        "jsoftmax.fused_cross_entropy, and compare it step by step with optax's loss."
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training set "
        "(default 30, or 3 with --quick; 0 only evaluates, e.g. with --load)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per step (default 64, or 32 with --quick)",
    )
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=None,
        help="hidden layer widths (default 512 256, or 64 with --quick)",
    )
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.1,
        help="fraction of the steps spent warming the learning rate up from 0",
    )
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="adamw weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="ε in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    parser.add_argument("--split-seed", type=int, default=0, help="train/test split")
    parser.add_argument("--save", metavar="PATH", help="write the trained parameters (.npz)")
    parser.add_argument(
        "--load",
        metavar="PATH",
        help="start from these parameters (.npz) "
        "instead of a random initialization; the widths come from the file",
    )
    parser.add_argument("--out", metavar="DIR", help="results folder (default experiments/results)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run for tests")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 30
    if args.batch_size is None:
        args.batch_size = 32 if args.quick else 64
    if args.hidden is None:
        args.hidden = [64] if args.quick else [512, 256]
    if args.epochs < 0:
        parser.error("--epochs must be >= 0")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if any(h < 1 for h in args.hidden):
        parser.error("--hidden widths must be >= 1")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error("--label-smoothing must be in [0, 1)")
    if not 0.0 <= args.warmup_fraction < 1.0:
        parser.error("--warmup-fraction must be in [0, 1)")
    if args.load and not os.path.isfile(args.load):
        parser.error(f"--load: no such file: {args.load}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out = _common.results_dir(args.out)
    x_train, y_train, x_test, y_test = _common.digits_split(args.split_seed)
    if args.batch_size > len(x_train):
        raise SystemExit(f"--batch-size: {args.batch_size} exceeds the {len(x_train)} examples")

    if args.load:
        params0 = load_params(args.load)
        hidden = [int(params0[f"w{i}"].shape[1]) for i in range(num_layers(params0) - 1)]
    else:
        hidden = list(args.hidden)
        params0 = init_params(args.seed, hidden)

    steps_per_epoch = len(x_train) // args.batch_size  # the ragged last batch is dropped
    total_steps = args.epochs * steps_per_epoch
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.lr,
        warmup_steps=int(args.warmup_fraction * total_steps),
        decay_steps=max(total_steps, 1),
        end_value=args.lr * 1e-2,
    )
    optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
    eps = args.label_smoothing
    runs = {
        "jsoftmax": make_step(jsoftmax_loss(eps), optimizer),
        "optax": make_step(optax_loss(eps), optimizer),
    }
    same_input_check = make_same_input_check(jsoftmax_loss(eps), optax_loss(eps))
    state = {name: (params0, optimizer.init(params0)) for name in runs}
    step_loss = {name: np.zeros(total_steps) for name in runs}
    step_time = {name: np.zeros(total_steps) for name in runs}
    same_input = np.zeros((total_steps, 3))  # |loss diff|, max |grad diff|, max |grad|
    curves: dict[str, dict[str, list[float]]] = {
        name: {"train_loss": [], "train_accuracy": [], "test_loss": [], "test_accuracy": []}
        for name in runs
    }

    def record_epoch() -> None:
        for name, (params, _) in state.items():
            for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
                loss, acc = evaluate(params, x, y)
                curves[name][f"{split}_loss"].append(float(loss))
                curves[name][f"{split}_accuracy"].append(float(acc))

    record_epoch()  # epoch 0: the initial parameters
    rng = np.random.default_rng(args.seed)
    step = 0
    with tqdm(total=total_steps, desc="training", unit="step", disable=total_steps == 0) as bar:
        for _ in range(args.epochs):
            order = rng.permutation(len(x_train))
            for b in range(steps_per_epoch):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                xb, yb = jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx])
                same_input[step] = [
                    float(v) for v in same_input_check(state["jsoftmax"][0], xb, yb)
                ]
                # Alternate which run goes first so that neither is favoured by caches.
                names = list(runs) if step % 2 == 0 else list(runs)[::-1]
                for name in names:
                    params, opt_state = state[name]
                    start = time.perf_counter()
                    params, opt_state, loss = jax.block_until_ready(
                        runs[name](params, opt_state, xb, yb)
                    )
                    step_time[name][step] = time.perf_counter() - start
                    state[name] = (params, opt_state)
                    step_loss[name][step] = float(loss)
                bar.set_postfix(loss=f"{step_loss['jsoftmax'][step]:.4f}", refresh=False)
                bar.update()
                step += 1
            record_epoch()

    result: dict[str, Any] = {
        "config": {
            **vars(args),
            "hidden": hidden,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "train_examples": len(x_train),
            "test_examples": len(x_test),
        },
        "device": str(jax.devices()[0]),
        "jax_version": jax.__version__,
        "optax_version": optax.__version__,
        "test_accuracy": curves["jsoftmax"]["test_accuracy"][-1],
        "optax_test_accuracy": curves["optax"]["test_accuracy"][-1],
        "train_accuracy": curves["jsoftmax"]["train_accuracy"][-1],
        "curves": curves,
        "peer": (
            "optax.softmax_cross_entropy_with_integer_labels"
            if eps == 0
            else f"(1 - {eps}) * optax.softmax_cross_entropy_with_integer_labels + {eps} * "
            "optax.softmax_cross_entropy(logits, uniform 1/C): the same smoothed target"
        ),
    }

    lines = []
    if total_steps > 0:
        diff = np.abs(step_loss["jsoftmax"] - step_loss["optax"])
        # Drop the first steps of each run: they include compilation.
        warmup = min(10, total_steps // 2)
        median_us = {k: 1e6 * float(np.median(t[warmup:])) for k, t in step_time.items()}
        result.update(
            step_loss={k: v.tolist() for k, v in step_loss.items()},
            step_learning_rate=np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(total_steps))),
            # Two independent training runs: round-off differences in the gradients are
            # carried forward and amplified by the optimizer, step after step.
            trajectory_max_abs_loss_difference=float(diff.max()),
            trajectory_first_step_abs_loss_difference=float(diff[0]),
            # Both losses on the same parameters and batch at every step: pure round-off.
            same_input_max_abs_loss_difference=float(same_input[:, 0].max()),
            same_input_max_abs_grad_difference=float(same_input[:, 1].max()),
            same_input_max_rel_grad_difference=float((same_input[:, 1] / same_input[:, 2]).max()),
            same_input_loss_difference=same_input[:, 0].tolist(),
            median_step_time_us=median_us,
            step_time_ratio_jsoftmax_over_optax=median_us["jsoftmax"] / median_us["optax"],
            timed_steps=total_steps - warmup,
        )
        png_curves = plot_curves(
            out / "train_digits_curves.png", result, curves, step_loss, steps_per_epoch
        )
        png_compare = plot_comparison(out / "train_digits_vs_optax.png", result, step_loss)
        result["png"] = [str(png_curves), str(png_compare)]
        smoothing = f"label smoothing {eps} in both" if eps else "no label smoothing"
        lines += [
            f"jsoftmax vs optax: same seed, same {total_steps} batches, {smoothing}",
            "  same parameters and batch, every step: max |loss diff| "
            f"{result['same_input_max_abs_loss_difference']:.2e} nats, max |grad diff| "
            f"{result['same_input_max_abs_grad_difference']:.2e} "
            f"({result['same_input_max_rel_grad_difference']:.1e} of the largest gradient)",
            f"  two independent runs: max |loss diff| {diff.max():.2e} nats "
            f"(step 1: {diff[0]:.2e}); round-off carried through {total_steps} adamw steps",
            f"  median step time after {warmup} warm-up steps: jsoftmax "
            f"{median_us['jsoftmax']:.0f} us, optax {median_us['optax']:.0f} us "
            f"(ratio {result['step_time_ratio_jsoftmax_over_optax']:.2f}) on {result['device']}",
            f"  test accuracy of the optax-trained model: {result['optax_test_accuracy']:.3f}",
        ]
    if args.save:
        result["saved_params"] = str(save_params(args.save, state["jsoftmax"][0]))
        lines.append(f"saved parameters to {result['saved_params']}")
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_path = _common.write_json(out / "train_digits.json", result)
    lines.append(f"wrote {json_path}" + "".join(f", {p}" for p in result.get("png", [])))
    lines.append(f"test accuracy: {result['test_accuracy']:.3f}")
    print("\n".join(lines), flush=True)
    return result


def plot_curves(path: Path, result: dict[str, Any], curves, step_loss, steps_per_epoch) -> Path:
    plt = _common.pyplot()
    c = curves["jsoftmax"]
    epochs = np.arange(len(c["train_loss"]))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = np.arange(1, len(step_loss["jsoftmax"]) + 1) / steps_per_epoch
    eps = result["config"]["label_smoothing"]
    ax_loss.plot(
        steps,
        step_loss["jsoftmax"],
        color="0.7",
        lw=0.8,
        label=f"mini-batch training objective (smoothing ε={eps})",
    )
    ax_loss.plot(epochs, c["train_loss"], "o-", ms=3, label="train set (ε=0)")
    ax_loss.plot(epochs, c["test_loss"], "s-", ms=3, label="test set (ε=0)")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch (passes over the training set)")
    ax_loss.set_ylabel("mean cross-entropy (nats, log scale)")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    # Epoch 0 (chance level) is left out of the accuracy panel so that the top stays readable.
    shown = epochs[1:] if len(epochs) > 1 else epochs
    train_acc = 100 * np.asarray(c["train_accuracy"])[shown]
    test_acc = 100 * np.asarray(c["test_accuracy"])[shown]
    ax_acc.plot(shown, train_acc, "o-", ms=3, label="train set")
    ax_acc.plot(shown, test_acc, "s-", ms=3, label="test set")
    ax_acc.set_ylim(max(0.0, min(test_acc.min(), train_acc.min()) - 2), 100.5)
    ax_acc.set_xlim(-0.5, epochs[-1] + 0.5)
    ax_acc.set_xlabel("epoch (passes over the training set)")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title(
        f"Accuracy (final test: {100 * result['test_accuracy']:.1f}%; "
        f"at initialization: {100 * c['test_accuracy'][0]:.0f}%)"
    )
    ax_acc.legend(loc="lower right")
    cfg = result["config"]
    fig.suptitle(
        f"MLP 64-{'-'.join(map(str, cfg['hidden']))}-10 on scikit-learn digits "
        f"({cfg['train_examples']} train / {cfg['test_examples']} test), adamw + warmup-cosine, "
        "loss = jsoftmax.fused_cross_entropy"
    )
    return _common.save_figure(fig, path)


def plot_comparison(path: Path, result: dict[str, Any], step_loss) -> Path:
    plt = _common.pyplot()
    fig, (ax, ax_diff) = plt.subplots(
        2, 1, figsize=(9.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    steps = np.arange(1, len(step_loss["jsoftmax"]) + 1)
    eps = result["config"]["label_smoothing"]
    peer = "optax.softmax_cross_entropy_with_integer_labels"
    if eps:
        peer += f" (smoothing ε={eps} added by linearity)"
    ax.plot(steps, step_loss["optax"], lw=3.5, color="tab:orange", alpha=0.5, label=peer)
    ax.plot(
        steps,
        step_loss["jsoftmax"],
        lw=1.0,
        color="tab:blue",
        label=f"jsoftmax.fused_cross_entropy(label_smoothing={eps})",
    )
    ax.set_yscale("log")
    ax.set_ylabel("mini-batch training loss (nats, log scale)")
    ax.set_title(
        "One model, seed and batch order trained twice, once per loss: the curves coincide"
    )
    ax.legend()
    diff = np.abs(step_loss["jsoftmax"] - step_loss["optax"])
    same = np.asarray(result["same_input_loss_difference"])
    # Exact agreement (0) cannot be drawn on a log axis: it is drawn at the floor.
    floor = 1e-10
    ax_diff.plot(
        steps,
        np.maximum(diff, floor),
        ".",
        ms=2.5,
        color="tab:red",
        label="two independent runs (round-off carried forward by adamw)",
    )
    ax_diff.plot(
        steps,
        np.maximum(same, floor),
        ".",
        ms=2.5,
        color="tab:green",
        label="same parameters and batch (round-off of one evaluation)",
    )
    ax_diff.axhline(
        np.finfo(np.float32).eps, color="0.3", ls=":", label="float32 machine epsilon, 1.19e-7"
    )
    ax_diff.set_yscale("log")
    ax_diff.set_ylim(floor / 3, max(1e-4, diff.max() * 5))
    ax_diff.set_xlabel("optimizer step")
    ax_diff.set_ylabel(f"|jsoftmax − optax| (nats)\n(0 drawn at {floor:g})")
    med = result["median_step_time_us"]
    ax_diff.set_title(
        f"Largest difference: {result['same_input_max_abs_loss_difference']:.1e} nats on the "
        f"same input, {result['trajectory_max_abs_loss_difference']:.1e} nats between runs\n"
        f"Median time of one training step: jsoftmax {med['jsoftmax']:.0f} µs, "
        f"optax {med['optax']:.0f} µs ({result['device']})"
    )
    ax_diff.legend(loc="upper left", markerscale=3)
    return _common.save_figure(fig, path)


if __name__ == "__main__":
    main()
