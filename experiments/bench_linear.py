"""Memory and time of ``jsm.linear_cross_entropy`` against the naive linear head + optax loss.

The naive path forms the logits ``x @ w`` ([N, V] float32), applies
``optax.softmax_cross_entropy_with_integer_labels``, takes the mean and differentiates with
``jax.value_and_grad`` with respect to ``(x, w)``. The chunked path computes the same value and
gradients with ``linear_cross_entropy(x, w, labels)`` (``reduction="mean"``).

* Memory: ``temp_size_in_bytes`` of ``memory_analysis()`` of the compiled ``value_and_grad``,
  for N from 1k to 64k tokens at D=512, V=32768. Compile only: nothing that large is run.
* Time: the two paths at N=2048, D=256, V=32768, run in the same process, interleaved (one
  call of each per round, the order alternating); the speed ratio is the median over rounds of
  naive time / chunked time, for wall-clock time and for the process's CPU time (which a busy,
  shared machine disturbs less). The first call of each checks that the two agree.
  ``--chunks`` adds fixed chunk sizes to the same rounds.

Writes ``bench_linear.json`` and ``bench_linear.png`` (temporary memory against N) under
``experiments/results/`` and prints a table.

Examples::

    python experiments/bench_linear.py
    python experiments/bench_linear.py --rounds 15 --chunks 128 256 512
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jsoftmax._linear import default_chunk_size, linear_cross_entropy

MEMORY_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def naive_loss(x, w, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, labels))


def chunked_loss(chunk_size):
    def loss(x, w, labels):
        return linear_cross_entropy(x, w, labels, chunk_size=chunk_size)

    return loss


def value_and_grad(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_mib(loss, n: int, d: int, v: int) -> float:
    """Temporary memory of the compiled value_and_grad, from shapes only (nothing runs)."""
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    stats = value_and_grad(loss).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes / 2**20


def measure_memory(tokens: Sequence[int], d: int, v: int) -> list[dict]:
    rows = []
    for n in tqdm(tokens, desc="memory (compile only)"):
        rows.append(
            {
                "tokens": n,
                "naive_mib": temp_mib(naive_loss, n, d, v),
                "chunked_mib": temp_mib(chunked_loss(None), n, d, v),
                "chunk_size": default_chunk_size(n, v),
            }
        )
    return rows


def _inputs(n: int, d: int, v: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return x, w, labels


def measure_time(n: int, d: int, v: int, rounds: int, chunks: Sequence[int | None]) -> dict:
    x, w, labels = _inputs(n, d, v)
    variants = {"naive": value_and_grad(naive_loss)}
    for c in chunks:
        variants[f"chunked[{'auto' if c is None else c}]"] = value_and_grad(chunked_loss(c))
    # Warm-up (compiles) doubles as the correctness check against the naive path.
    ref_loss, (ref_dx, ref_dw) = jax.block_until_ready(variants["naive"](x, w, labels))
    checks = {}
    for name, f in variants.items():
        loss, (dx, dw) = jax.block_until_ready(f(x, w, labels))
        checks[name] = {
            "loss_abs_diff": float(abs(loss - ref_loss)),
            "dx_max_abs_diff": float(jnp.max(jnp.abs(dx - ref_dx))),
            "dw_max_abs_diff": float(jnp.max(jnp.abs(dw - ref_dw))),
        }
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-4, atol=1e-7)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in tqdm(range(rounds), desc=f"time N={n} D={d} V={v}"):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(variants[name](x, w, labels))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    def ratios(samples):
        # Per-round ratios (naive / chunked), then their median: > 1 means faster than naive.
        return {
            name: float(np.median(np.array(samples["naive"]) / np.array(t)))
            for name, t in samples.items()
            if name != "naive"
        }

    return {
        "tokens": n,
        "dim": d,
        "vocab": v,
        "rounds": rounds,
        "median_seconds": {name: float(np.median(t)) for name, t in times.items()},
        "speedup_vs_naive": ratios(times),
        "median_cpu_seconds": {name: float(np.median(t)) for name, t in cpu.items()},
        "cpu_speedup_vs_naive": ratios(cpu),
        "seconds": times,
        "cpu_seconds": cpu,
        "agreement": checks,
    }


def plot(memory: list[dict], d: int, v: int, path) -> None:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["tokens"] for r in memory]
    ax.loglog(n, [r["naive_mib"] for r in memory], "o-", label="naive: x @ w + optax")
    ax.loglog(n, [r["chunked_mib"] for r in memory], "s-", label="jsm.linear_cross_entropy")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("temporary memory (MiB)")
    ax.set_title(f"value_and_grad wrt (x, w), D={d}, V={v}, float32")
    ax.set_xticks(n, [f"{k // 1024}k" for k in n])
    ax.legend()
    _common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-dim", type=int, default=512)
    parser.add_argument("--memory-vocab", type=int, default=32768)
    parser.add_argument("--memory-tokens", type=int, nargs="+", default=list(MEMORY_TOKENS))
    parser.add_argument("--time-tokens", type=int, default=2048)
    parser.add_argument("--time-dim", type=int, default=256)
    parser.add_argument("--time-vocab", type=int, default=32768)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="*",
        default=[],
        help="fixed chunk sizes timed besides the automatic one",
    )
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)

    d, v = args.memory_dim, args.memory_vocab
    memory = measure_memory(args.memory_tokens, d, v)
    timing = measure_time(
        args.time_tokens, args.time_dim, args.time_vocab, args.rounds, [None, *args.chunks]
    )

    print(f"\ntemporary memory of value_and_grad wrt (x, w), mean, D={d}, V={v} (MiB)")
    print(f"{'N':>7} {'naive':>10} {'chunked':>10} {'ratio':>8} {'chunk':>6}")
    for r in memory:
        print(
            f"{r['tokens']:>7} {r['naive_mib']:>10.1f} {r['chunked_mib']:>10.1f} "
            f"{r['naive_mib'] / r['chunked_mib']:>7.1f}x {r['chunk_size']:>6}"
        )
    by_n = {r["tokens"]: r for r in memory}
    summary = {}
    if 8192 in by_n:
        summary["chunked_over_naive_at_8192"] = by_n[8192]["chunked_mib"] / by_n[8192]["naive_mib"]
    if 8192 in by_n and 32768 in by_n:
        summary["chunked_growth_8192_to_32768"] = (
            by_n[32768]["chunked_mib"] / by_n[8192]["chunked_mib"]
        )
    print(
        f"\ntime, N={timing['tokens']} D={timing['dim']} V={timing['vocab']}, "
        f"median of {timing['rounds']} interleaved rounds"
    )
    print(f"  {'':<16} {'wall':>9} {'speed':>7} {'cpu':>9} {'speed':>7}")
    for name, sec in timing["median_seconds"].items():
        speed = timing["speedup_vs_naive"].get(name, 1.0)
        cpu = timing["median_cpu_seconds"][name]
        cpu_speed = timing["cpu_speedup_vs_naive"].get(name, 1.0)
        print(f"  {name:<16} {sec:8.3f}s {speed:6.2f}x {cpu:8.3f}s {cpu_speed:6.2f}x")
    summary["speed_vs_naive_auto"] = timing["speedup_vs_naive"]["chunked[auto]"]
    summary["cpu_speed_vs_naive_auto"] = timing["cpu_speedup_vs_naive"]["chunked[auto]"]
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")

    result = {
        "config": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "jax": jax.__version__,
            "devices": [str(dv) for dv in jax.devices()],
        },
        "memory": memory,
        "time": timing,
        "summary": summary,
    }
    out = _common.results_dir(args.out)
    _common.write_json(out / "bench_linear.json", result)
    plot(memory, d, v, out / "bench_linear.png")
    print(f"wrote {out / 'bench_linear.json'} and {out / 'bench_linear.png'}")
    return result


if __name__ == "__main__":
    main()
