"""Speed of the fused loss and the normalizers against optax and jax.nn, in one process.

For every shape and dtype this times, interleaved (A, B, A, B, ...) so that a noisy machine
slows both sides alike, and reports the median of ``--pairs`` pairs:

* ``jax.value_and_grad`` of ``fused_cross_entropy(logits, labels, reduction="mean")`` against
  ``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``;
* ``jsoftmax.softmax`` / ``log_softmax`` against ``jax.nn.softmax`` / ``jax.nn.log_softmax``;
* the *floor*: one read-only pass (a row max) plus one read-write pass (a scale) over the
  logits, about the least any ``value_and_grad`` of a softmax loss must do, and our
  ``value_and_grad`` time as a multiple of it.

A ratio is the peer's time over ours: above 1 we are faster. It also counts what XLA makes of
each program: the fusions and the ``[rows, classes]`` arrays it writes besides the result.

    python experiments/bench_loss.py            # the full table (several minutes on 2 cores)
    python experiments/bench_loss.py --quick    # small shapes, a smoke test
    python experiments/bench_loss.py --shapes 8192x32768,1024x131072 --out results/device

Writes ``experiments/results/bench_loss.json`` and ``bench_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import pyplot, results_dir, save_figure, write_json  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jsoftmax as jsm  # noqa: E402

SHAPES = [(1024, 32768), (4096, 32768), (8192, 4096), (64, 262144)]
QUICK_SHAPES = [(256, 4096), (64, 16384)]


def _optax_loss(logits, labels):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _ours_loss(logits, labels):
    return jsm.fused_cross_entropy(logits, labels, reduction="mean")


def _floor(logits):
    # One read-only pass (the row max) and one read-write pass (a scale of every entry).
    return logits * jnp.max(logits, axis=-1, keepdims=True).astype(logits.dtype)


def programs():
    """Pairs (ours, peer) of jitted programs, by name."""
    vg = jax.value_and_grad
    return {
        "value_and_grad": (jax.jit(vg(_ours_loss)), jax.jit(vg(_optax_loss)), "optax"),
        "softmax": (jax.jit(jsm.softmax), jax.jit(jax.nn.softmax), "jax.nn"),
        "log_softmax": (jax.jit(jsm.log_softmax), jax.jit(jax.nn.log_softmax), "jax.nn"),
    }


def hlo_summary(fn, *args) -> dict:
    """Fusions in the optimized program and the big arrays it writes besides its outputs."""
    text = fn.lower(*args).compile().as_text()
    entry = text[text.index("ENTRY") :]
    shape = "x".join(str(s) for s in args[0].shape)
    big = [
        line.split("=")[0].strip()
        for line in entry.splitlines()
        if " fusion(" in line and re.search(rf"\[{shape.replace('x', ',')}\]", line.split("=")[1])
    ]
    return {
        "fusions": sum(1 for line in entry.splitlines() if " fusion(" in line),
        "full_size_arrays_written": len(big),
    }


def time_pair(a, b, args, pairs: int) -> tuple[float, float]:
    jax.block_until_ready(a(*args))
    jax.block_until_ready(b(*args))
    ta, tb = [], []
    for _ in range(pairs):
        for f, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def run(shapes, dtypes, pairs: int) -> list[dict]:
    rows = []
    progs = programs()
    floor = jax.jit(_floor)
    jobs = [(s, d) for s in shapes for d in dtypes]
    for (n, c), dtype in tqdm(jobs, desc="bench_loss", unit="shape"):
        key = jax.random.key(0)
        logits = (3 * jax.random.normal(key, (n, c), jnp.float32)).astype(dtype)
        labels = jax.random.randint(jax.random.key(1), (n,), 0, c)
        for name, (ours, peer, peer_name) in progs.items():
            args = (logits, labels) if name == "value_and_grad" else (logits,)
            t_ours, t_peer = time_pair(ours, peer, args, pairs)
            row = {
                "function": name,
                "shape": [n, c],
                "dtype": jnp.dtype(dtype).name,
                "peer": peer_name,
                "ours_ms": 1e3 * t_ours,
                "peer_ms": 1e3 * t_peer,
                "ratio": t_peer / t_ours,
                "ours_hlo": hlo_summary(ours, *args),
                "peer_hlo": hlo_summary(peer, *args),
            }
            if name == "value_and_grad":
                t_floor, _ = time_pair(floor, floor, (logits,), max(3, pairs // 2))
                row["floor_ms"] = 1e3 * t_floor
                row["floor_multiple"] = t_ours / t_floor
            rows.append(row)
            del args
    return rows


def markdown(rows) -> str:
    lines = [
        "| function | shape | dtype | ours (ms) | peer | peer (ms) | ratio (peer/ours) | × floor |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        floor = f"{r['floor_multiple']:.2f}" if "floor_multiple" in r else ""
        lines.append(
            f"| {r['function']} | {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | "
            f"{r['ours_ms']:.1f} | {r['peer']} | {r['peer_ms']:.1f} | {r['ratio']:.2f} | "
            f"{floor} |"
        )
    return "\n".join(lines)


def plot(rows, path) -> None:
    plt = pyplot()
    funcs = ["value_and_grad", "softmax", "log_softmax"]
    fig, axes = plt.subplots(1, len(funcs), figsize=(5.5 * len(funcs), 5), sharey=True)
    for ax, func in zip(axes, funcs, strict=True):
        sel = [r for r in rows if r["function"] == func]
        labels = [f"{r['shape'][0]}×{r['shape'][1]}\n{r['dtype']}" for r in sel]
        ratios = [r["ratio"] for r in sel]
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        ax.bar(range(len(sel)), ratios, color=colors)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(sel)), labels, fontsize=8, rotation=60, ha="right")
        peer = sel[0]["peer"] if sel else ""
        ax.set_title(f"{func}: {peer} time / jsoftmax time")
        ax.set_xlabel("logits shape [rows × classes], dtype")
        for i, x in enumerate(ratios):
            ax.text(i, x, f"{x:.2f}", ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("speed ratio (> 1: jsoftmax faster)")
    fig.suptitle(
        f"jsoftmax vs peers on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores), median of interleaved pairs"
    )
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few pairs")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved pairs (default 11)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated")
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated ROWSxCLASSES (e.g. 8192x32768,1024x131072) instead of the defaults",
    )
    parser.add_argument("--out", default=None, help="output directory (default results/)")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw the PNG from an existing bench_loss.json; time nothing",
    )
    args = parser.parse_args(argv)
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be >= 1")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        try:
            shapes = [
                tuple(int(v) for v in item.lower().split("x")) for item in args.shapes.split(",")
            ]
        except ValueError:
            parser.error(f"--shapes: expected ROWSxCLASSES[,ROWSxCLASSES...], got {args.shapes!r}")
        if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
            parser.error(f"--shapes: expected ROWSxCLASSES[,ROWSxCLASSES...], got {args.shapes!r}")
    pairs = args.pairs or (3 if args.quick else 11)
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    out = results_dir(args.out)
    if args.replot:
        with open(os.path.join(out, "bench_loss.json")) as f:
            result = json.load(f)
        plot(result["rows"], os.path.join(out, "bench_loss.png"))
        return result
    rows = run(shapes, dtypes, pairs)
    table = markdown(rows)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": str(jax.devices()[0]),
            "device_kind": jax.devices()[0].device_kind,
            "jax": jax.__version__,
        },
        "pairs": pairs,
        "rows": rows,
        "markdown": table,
    }
    write_json(os.path.join(out, "bench_loss.json"), result)
    plot(rows, os.path.join(out, "bench_loss.png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
