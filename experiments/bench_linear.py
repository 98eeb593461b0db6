"""Memory and time of ``jsm.linear_cross_entropy`` against the naive head and tokamax.

Three heads compute the mean cross-entropy of ``x @ w`` and its gradients with respect to
``(x, w)`` under ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))``:

* naive: the logits ``x @ w`` ([N, V], float32) and
  ``optax.softmax_cross_entropy_with_integer_labels``, differentiated by JAX;
* tokamax: ``tokamax.linear_softmax_cross_entropy_loss(x, labels, w, reduction="mean",
  implementation="chunked_xla")`` (tokamax 0.0.17 needs Python >= 3.12 and jax >= 0.11:
  ``pip install "jsoftmax[tokamax]"``; elsewhere its column is left out and the script says why);
* jsoftmax: ``jsm.linear_cross_entropy(x, w, labels)``.

Measured:

* Memory (compile only, nothing runs): ``memory_analysis()`` of the compiled
  ``value_and_grad``; "peak" is temporaries + outputs (dx, dw and the loss), "temp" the
  temporaries alone. Against N (D=512, V=32768), against V (N=4096, D=256), and at the three
  shapes of the memory requirement.
* Time: the heads at (2048, 256, 32768) and (1024, 512, 50257), float32 and bfloat16, run in
  the same process, interleaved (one call of each per round, the order alternating); a speed
  ratio is the median over rounds of (peer time / jsoftmax time), for wall-clock time and for the
  process's CPU time (which a busy, shared machine disturbs less). The first call of each head
  checks it against the naive one (tokamax's error at a vocabulary that is not a multiple of its
  2048-column block is reported, not asserted: it pads the vocabulary without masking it).
* A whole training step of ``experiments/train_lm.py`` (model, AdamW update) with each head:
  peak memory at the script's sizes and at 8x its batch.

Writes ``bench_linear.json`` and ``bench_linear.png`` (peak memory against N and against V)
under ``experiments/results/`` and prints the tables.

Examples::

    python experiments/bench_linear.py                 # ~15 minutes on 2 CPU cores
    python experiments/bench_linear.py --quick         # small shapes, a smoke test
    python experiments/bench_linear.py --rounds 21 --skip-memory
    python experiments/bench_linear.py --skip-memory --compare-schedules  # one- vs two-pass
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jsoftmax as jsm
from jsoftmax import _linear

try:
    import tokamax
except ImportError as error:  # Python < 3.12, jax < 0.11, or not installed
    tokamax = None
    TOKAMAX_MISSING = (
        f"tokamax is not available here ({error}); it needs Python >= 3.12 and jax >= 0.11 "
        f"(this is Python {platform.python_version()}, jax {jax.__version__}): "
        'pip install "jsoftmax[tokamax]" on Python 3.12+'
    )
else:
    TOKAMAX_MISSING = None

MEMORY_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
MEMORY_VOCABS = (8192, 16384, 32768, 50257, 65536, 131072, 151936, 262144)
REQUIRED_SHAPES = ((8192, 512, 32768), (8192, 512, 50257), (4096, 256, 262144))
TIME_SHAPES = ((2048, 256, 32768), (1024, 512, 50257))
QUICK_TIME_SHAPES = ((512, 64, 4096), (256, 64, 2049))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def naive_loss(x, w, labels):
    logits = jnp.dot(x, w, preferred_element_type=jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def tokamax_loss(x, w, labels):
    return tokamax.linear_softmax_cross_entropy_loss(
        x, labels, w, reduction="mean", implementation="chunked_xla"
    )


def jsoftmax_loss(x, w, labels):
    return jsm.linear_cross_entropy(x, w, labels)


def jsoftmax_two_pass_loss(x, w, labels):
    """jsoftmax with its two-pass schedule forced (the one-pass block made too small to hold
    any row), to measure what the one-pass saves. Read while tracing: jit it fresh."""
    limit = _linear._ONE_PASS_ELEMENTS
    _linear._ONE_PASS_ELEMENTS = 0
    try:
        return jsm.linear_cross_entropy(x, w, labels)
    finally:
        _linear._ONE_PASS_ELEMENTS = limit


COMPARE_SCHEDULES = False  # --compare-schedules: time the two-pass schedule as a fourth head


def heads() -> dict[str, Callable]:
    out = {"naive": naive_loss}
    if tokamax is not None:
        out["tokamax"] = tokamax_loss
    out["jsoftmax"] = jsoftmax_loss
    if COMPARE_SCHEDULES:
        out["jsoftmax two-pass"] = jsoftmax_two_pass_loss
    return out


def value_and_grad(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def memory_mib(loss, n: int, d: int, v: int, dtype=jnp.float32) -> dict[str, float]:
    """Temporaries, outputs and their sum of the compiled value_and_grad (nothing runs)."""
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    stats = value_and_grad(loss).lower(*args).compile().memory_analysis()
    temp = stats.temp_size_in_bytes / 2**20
    out = stats.output_size_in_bytes / 2**20
    return {"temp_mib": temp, "output_mib": out, "peak_mib": temp + out}


def measure_memory(shapes: Sequence[tuple[int, int, int]], desc: str) -> list[dict]:
    rows = []
    for n, d, v in tqdm(shapes, desc=desc):
        plan = _linear._plan(n, d, v, None, True)
        row = {
            "tokens": n,
            "dim": d,
            "vocab": v,
            "schedule": "one-pass" if plan.one_pass else "two-pass",
            "rows": plan.rows,
            "tile": plan.tile,
        }
        for name, loss in heads().items():
            if name != "jsoftmax two-pass":
                row[name] = memory_mib(loss, n, d, v)
        rows.append(row)
    return rows


def _inputs(n: int, d: int, v: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return x, w, labels


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def measure_time(n: int, d: int, v: int, dtype_name: str, rounds: int) -> dict:
    dtype = DTYPES[dtype_name]
    x, w, labels = _inputs(n, d, v, dtype)
    fns = {name: value_and_grad(loss) for name, loss in heads().items()}
    # Warm-up (compiles), which doubles as the check against the naive head.
    ref = jax.block_until_ready(fns["naive"](x, w, labels))
    agreement = {}
    loose = dtype_name != "float32"
    for name, f in fns.items():
        loss, grads = jax.block_until_ready(f(x, w, labels))
        errs = [_max_rel(a, b) for a, b in zip((loss, *grads), (ref[0], *ref[1]), strict=True)]
        agreement[name] = dict(zip(("loss", "dx", "dw"), errs, strict=True))
        if name == "jsoftmax":
            assert max(errs) < (2e-2 if loose else 2e-4), (name, errs)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in tqdm(range(rounds), desc=f"time N={n} D={d} V={v} {dtype_name}", leave=False):
        for name in names if r % 2 == 0 else names[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fns[name](x, w, labels))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    def speedups(samples):
        # Per-round ratios peer / jsoftmax, then their median: > 1 means jsoftmax is faster.
        ours = np.array(samples["jsoftmax"])
        return {
            name: float(np.median(np.array(t) / ours))
            for name, t in samples.items()
            if name != "jsoftmax"
        }

    return {
        "tokens": n,
        "dim": d,
        "vocab": v,
        "dtype": dtype_name,
        "rounds": rounds,
        "median_seconds": {name: float(np.median(t)) for name, t in wall.items()},
        "median_cpu_seconds": {name: float(np.median(t)) for name, t in cpu.items()},
        "jsoftmax_speedup": speedups(wall),
        "jsoftmax_cpu_speedup": speedups(cpu),
        "agreement_with_naive": agreement,
        "seconds": wall,
        "cpu_seconds": cpu,
    }


def train_lm_memory(batch: int) -> dict:
    """Peak memory of one training step of experiments/train_lm.py with each head."""
    import train_lm

    return train_lm.step_memory_by_head(batch, tokamax_head=tokamax is not None)


def plot(by_tokens: list[dict], by_vocab: list[dict], path) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"naive": "o-", "tokamax": "^-", "jsoftmax": "s-"}
    labels = {
        "naive": "naive: x @ w + optax",
        "tokamax": "tokamax chunked_xla",
        "jsoftmax": "jsm.linear_cross_entropy",
    }
    for ax, rows, key, title in (
        (axes[0], by_tokens, "tokens", "against N"),
        (axes[1], by_vocab, "vocab", "against V"),
    ):
        if not rows:
            continue
        xs = [r[key] for r in rows]
        for name in styles:
            if name in rows[0]:
                ax.loglog(xs, [r[name]["peak_mib"] for r in rows], styles[name], label=labels[name])
        ax.loglog(xs, [r["jsoftmax"]["output_mib"] for r in rows], "k:", label="outputs (dx, dw)")
        d, other = rows[0]["dim"], rows[0]["vocab" if key == "tokens" else "tokens"]
        fixed = f"V={other}" if key == "tokens" else f"N={other}"
        ax.set_title(f"peak memory {title} (D={d}, {fixed}, float32)")
        ax.set_xlabel("tokens N" if key == "tokens" else "vocabulary V")
        ax.set_ylabel("temporaries + outputs (MiB)")
        ax.legend(fontsize=8)
    _common.save_figure(fig, path)


def _mib(cell: dict | None) -> str:
    return "-" if cell is None else f"{cell['peak_mib']:.1f} ({cell['temp_mib']:.1f})"


def print_tables(result: dict) -> None:
    names = [n for n in ("naive", "tokamax", "jsoftmax") if n in heads()]
    timed = [n for n in heads()]
    if result["memory"]["required"]:
        print("\npeak memory of value_and_grad wrt (x, w), mean, float32: MiB (temporaries)")
        print(f"{'(N, D, V)':<22}" + "".join(f"{n:>20}" for n in names) + "  schedule")
        for r in result["memory"]["required"]:
            shape = f"({r['tokens']}, {r['dim']}, {r['vocab']})"
            cells = "".join(f"{_mib(r.get(n)):>20}" for n in names)
            print(f"{shape:<22}{cells}  {r['schedule']}")
    print("\ntime of value_and_grad: jsoftmax speedup = peer time / jsoftmax time (median)")
    for t in result["time"]:
        shape = f"({t['tokens']}, {t['dim']}, {t['vocab']}) {t['dtype']}"
        parts = [f"{n} {t['median_seconds'][n]:.3f}s" for n in timed]
        ratios = [
            f"vs {n} {t['jsoftmax_speedup'][n]:.2f}x wall, {t['jsoftmax_cpu_speedup'][n]:.2f}x cpu"
            for n in timed
            if n != "jsoftmax"
        ]
        print(f"  {shape:<28} " + ", ".join(parts) + " | " + "; ".join(ratios))
    for batch, m in result["train_lm"].items():
        cells = ", ".join(
            f"{n} {c['peak_mib']:.1f} MiB (temp {c['temp_mib']:.1f})" for n, c in m["heads"].items()
        )
        print(f"train_lm step, batch {batch}: {cells}")
    if TOKAMAX_MISSING:
        print(f"\nno tokamax column: {TOKAMAX_MISSING}")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--skip-memory", action="store_true", help="timing only")
    parser.add_argument("--skip-time", action="store_true", help="memory only")
    parser.add_argument(
        "--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="timed dtypes"
    )
    parser.add_argument(
        "--compare-schedules",
        action="store_true",
        help="also time jsoftmax with its two-pass schedule forced (timing only)",
    )
    sizes = parser.add_argument_group(
        "sizes", "other shapes than the defaults (accelerator-sized ones: `make bench-device`)"
    )
    sizes.add_argument("--memory-tokens", type=int, nargs="+", help="N of the memory-vs-N curve")
    sizes.add_argument("--memory-dim", type=int, help="D of the memory-vs-N curve")
    sizes.add_argument("--memory-vocab", type=int, help="V of the memory-vs-N curve")
    sizes.add_argument("--time-tokens", type=int, nargs="+", help="N of the timed shapes")
    sizes.add_argument("--time-dim", type=int, help="D of the timed shapes")
    sizes.add_argument("--time-vocab", type=int, help="V of the timed shapes")
    parser.add_argument("--out", default=None, help="results folder")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser_ = parser()
    args = parser_.parse_args(argv)
    time_given = (args.time_tokens, args.time_dim, args.time_vocab)
    if any(a is not None for a in time_given) and not all(a is not None for a in time_given):
        parser_.error("--time-tokens, --time-dim and --time-vocab go together")
    global COMPARE_SCHEDULES
    COMPARE_SCHEDULES = args.compare_schedules and not args.skip_time
    if TOKAMAX_MISSING:
        print(f"no tokamax column: {TOKAMAX_MISSING}", file=sys.stderr)

    if args.quick:
        tokens, vocabs, required = (512, 1024), (2049, 4096), ((1024, 64, 4096),)
        time_shapes, rounds, batches = QUICK_TIME_SHAPES, min(args.rounds, 3), (64,)
        dim_n, dim_v, vocab_n, tokens_v = 64, 32, 4096, 256
    else:
        tokens, vocabs, required = MEMORY_TOKENS, MEMORY_VOCABS, REQUIRED_SHAPES
        time_shapes, rounds, batches = TIME_SHAPES, args.rounds, (512, 4096)
        dim_n, dim_v, vocab_n, tokens_v = 512, 256, 32768, 4096

    tokens = args.memory_tokens or tokens
    dim_n = args.memory_dim or dim_n
    vocab_n = args.memory_vocab or vocab_n
    if args.time_tokens:
        time_shapes = [(n, args.time_dim, args.time_vocab) for n in args.time_tokens]

    memory = {"by_tokens": [], "by_vocab": [], "required": []}
    if not args.skip_memory:
        memory["by_tokens"] = measure_memory([(n, dim_n, vocab_n) for n in tokens], "memory vs N")
        memory["by_vocab"] = measure_memory([(tokens_v, dim_v, v) for v in vocabs], "memory vs V")
        memory["required"] = measure_memory(required, "memory, required shapes")
    timing = []
    if not args.skip_time:
        for n, d, v in time_shapes:
            for dtype in args.dtypes:
                timing.append(measure_time(n, d, v, dtype, rounds))
    lm = {}
    if not args.skip_memory:
        lm = {str(b): train_lm_memory(b) for b in batches}

    result = {
        "config": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "tokamax": getattr(tokamax, "__version__", None),
            "devices": [str(dv) for dv in jax.devices()],
        },
        "tokamax_missing": TOKAMAX_MISSING,
        "memory": memory,
        "time": timing,
        "train_lm": lm,
    }
    print_tables(result)
    out = _common.results_dir(args.out)
    _common.write_json(out / "bench_linear.json", result)
    if memory["by_tokens"]:
        plot(memory["by_tokens"], memory["by_vocab"], out / "bench_linear.png")
    print(f"wrote {out / 'bench_linear.json'}" + (" and bench_linear.png" if lm else ""))
    return result


if __name__ == "__main__":
    main()
