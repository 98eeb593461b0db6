"""Per-device memory of the vocab-parallel losses for P = 1, 2, 4, 8 devices at a fixed size.

The class axis (the vocabulary) of a ``[N, V]`` problem is split over P devices and one
training step is compiled: the value and the gradient of the mean loss. XLA's
``memory_analysis()`` of the compiled program gives, per device, the bytes of its arguments
(the local shard of the logits, or of ``w``), of its outputs (the local gradient) and of its
temporaries. Nothing of size ``[N, V]`` should live on one device once P > 1.

Programs (each a ``value_and_grad`` of the mean loss):

* ``fused / shard_map``: ``fused_cross_entropy(local_logits, labels, axis_name="vocab")``
  inside ``jax.shard_map``, logits ``[N, V/P]`` per device, global integer labels.
* ``reference / shard_map``: the same with ``cross_entropy`` (plain autodiff), for contrast:
  its autodiff keeps ``[N, V/P]`` float32 temporaries.
* ``fused / jit``: ``fused_cross_entropy`` under plain ``jax.jit`` with logits placed with
  ``NamedSharding(mesh, P(None, "vocab"))`` on an explicit mesh (no ``axis_name``).
* ``linear / shard_map`` (when ``jsm.linear_cross_entropy`` is exported): hidden states
  ``[N, D]`` on every device, ``w`` split to ``[D, V/P]``, a fixed ``--chunk-size`` for every P.
  (With ``chunk_size=None`` the automatic chunk grows as ``V/P`` shrinks, to keep one block of
  logits near 16 MiB; its temporaries then stay near that block's size instead of falling.)

The table's ``max coll.`` column is the largest array (in elements) that any collective of
the compiled program moves: at most N (one number per row) when only per-row statistics cross
devices, and ``N·V/P`` or more if the logits were gathered.

The memory figures come from compiling only (``jax.ShapeDtypeStruct`` inputs). ``--check``
also runs each program once on random data and checks that its loss equals the P = 1 loss.
The script asks for 8 simulated CPU devices before JAX starts (``XLA_FLAGS``), so it runs on
one machine; on a machine with 8 accelerators it uses those.

Writes ``bench_sharded.json`` and ``bench_sharded.png`` under ``experiments/results/`` and prints
a table.

Examples::

    python experiments/bench_sharded.py
    python experiments/bench_sharded.py --rows 2048 --classes 65536 --check
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import _common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jsoftmax as jsm  # noqa: E402

MiB = 2**20


def logits_step(fn: Callable, mesh: jax.sharding.Mesh, mapped: bool) -> Callable:
    """``(logits, labels) -> (mean loss, d loss / d logits)`` with the classes split."""
    if not mapped:  # plain jit: the sharding travels with the inputs
        return jax.jit(jax.value_and_grad(lambda z, y: fn(z, y, reduction="mean")))

    def local(z, y):
        return jax.value_and_grad(lambda z: fn(z, y, reduction="mean", axis_name="vocab"))(z)

    return jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=(P(), P(None, "vocab"))
        )
    )


def linear_step(mesh: jax.sharding.Mesh, chunk_size: int | None) -> Callable:
    """``(x, w, labels) -> (mean loss, (dx, dw))`` with ``w`` split along V."""

    def local(x, w, y):
        def loss(x, w):
            return jsm.linear_cross_entropy(
                x, w, y, chunk_size=chunk_size, reduction="mean", axis_name="vocab"
            )

        return jax.value_and_grad(loss, (0, 1))(x, w)

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(), P(None, "vocab"), P()),
            out_specs=(P(), (P(), P(None, "vocab"))),
        )
    )


def device_pool(count: int) -> list:
    """The default devices when there are enough of them, else the simulated CPU devices."""
    return jax.devices() if jax.device_count() >= count else jax.devices("cpu")


def programs(num_devices: int, n: int, v: int, d: int, chunk_size: int | None):
    """``(name, step, argument shapes, scale of each float argument)`` for every program."""
    devices = device_pool(num_devices)[:num_devices]
    auto = jax.make_mesh((num_devices,), ("vocab",), (AxisType.Auto,), devices=devices)
    explicit = jax.make_mesh((num_devices,), ("vocab",), (AxisType.Explicit,), devices=devices)

    def sds(shape, dtype, mesh, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    out = []
    for name, fn, mesh, mapped in (
        ("fused / shard_map", jsm.fused_cross_entropy, auto, True),
        ("reference / shard_map", jsm.cross_entropy, auto, True),
        ("fused / jit", jsm.fused_cross_entropy, explicit, False),
    ):
        args = (sds((n, v), jnp.float32, mesh, P(None, "vocab")), sds((n,), jnp.int32, mesh, P()))
        out.append((name, logits_step(fn, mesh, mapped), args, (1.0, None)))
    if hasattr(jsm, "linear_cross_entropy"):
        args = (
            sds((n, d), jnp.float32, auto, P()),
            sds((d, v), jnp.float32, auto, P(None, "vocab")),
            sds((n,), jnp.int32, auto, P()),
        )
        # w scaled by 1/sqrt(D) so that the logits x @ w are O(1).
        step = linear_step(auto, chunk_size)
        out.append(("linear / shard_map", step, args, (1.0, d**-0.5, None)))
    return out


def random_inputs(args: Sequence[jax.ShapeDtypeStruct], scales, v: int, seed: int = 0):
    """Arrays for ``args``: scaled normal floats, integer labels in [0, V)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for a, scale in zip(args, scales, strict=True):
        if scale is None:
            host = rng.integers(0, v, size=a.shape).astype(a.dtype)
        else:
            host = (rng.normal(size=a.shape) * scale).astype(a.dtype)
        arrays.append(jax.device_put(host, a.sharding))
    return arrays


_COLLECTIVE = re.compile(
    r"=\s*(?P<result>\S.*?)\s+(?:all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\b(?:pred|bf16|[a-z]+\d+)\[([\d,]*)\]")


def largest_collective(hlo: str) -> int:
    """Elements of the largest array any collective of the compiled program produces."""
    largest = 0
    for match in _COLLECTIVE.finditer(hlo):
        for dims in _ARRAY.findall(match["result"]):
            largest = max(largest, math.prod(int(d) for d in dims.split(",") if d))
    return largest


def measure(
    device_counts: Sequence[int], n: int, v: int, d: int, chunk_size: int | None, check: bool
) -> list[dict]:
    rows, reference_loss = [], {}
    todo = [(p, prog) for p in device_counts for prog in programs(p, n, v, d, chunk_size)]
    for p, (name, step, args, scales) in tqdm(todo, desc="compile"):
        compiled = step.lower(*args).compile()
        mem = compiled.memory_analysis()
        row = {
            "program": name,
            "devices": p,
            "argument_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "largest_collective_elements": largest_collective(compiled.as_text()),
        }
        row["total_bytes"] = (
            row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"] - row["alias_bytes"]
        )
        if check:
            loss = float(compiled(*random_inputs(args, scales, v))[0])
            reference_loss.setdefault(name, loss)
            row["loss"] = loss
            row["matches_p1"] = bool(np.isclose(loss, reference_loss[name], rtol=1e-5))
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    check = "loss" in rows[0]
    head = (
        f"{'program':<22} {'P':>2} {'args MiB':>9} {'out MiB':>8} {'temp MiB':>9} {'total MiB':>10}"
    )
    head += f" {'total×P/total₁':>15} {'max coll.':>9}"
    head += f" {'loss':>10} {'=P1':>4}" if check else ""
    print(head)
    first = {}
    for r in rows:
        first.setdefault(r["program"], r["total_bytes"])
        scaled = r["total_bytes"] * r["devices"] / first[r["program"]]
        line = (
            f"{r['program']:<22} {r['devices']:>2} {r['argument_bytes'] / MiB:>9.2f} "
            f"{r['output_bytes'] / MiB:>8.2f} {r['temp_bytes'] / MiB:>9.3f} "
            f"{r['total_bytes'] / MiB:>10.2f} {scaled:>15.2f} "
            f"{r['largest_collective_elements']:>9}"
        )
        if check:
            line += f" {r['loss']:>10.6f} {'yes' if r['matches_p1'] else 'NO':>4}"
        print(line)


def plot(rows: list[dict], path, n: int, v: int) -> None:
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(r["program"] for r in rows))
    styles = dict(zip(names, ("o-", "s-", "x--", "^-"), strict=False))
    for name in names:
        mine = [r for r in rows if r["program"] == name]
        ps = np.array([r["devices"] for r in mine])
        for ax, key in zip(axes, ("total_bytes", "temp_bytes"), strict=True):
            vals = np.array([r[key] for r in mine]) / MiB
            (line,) = ax.plot(ps, np.maximum(vals, 1e-3), styles[name], label=name, ms=7)
            if key == "total_bytes":
                ax.plot(ps, vals[0] / ps, ":", color=line.get_color(), alpha=0.6)
    for ax, title in zip(
        axes,
        ("arguments + outputs + temporaries per device", "temporaries per device"),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["devices"] for r in rows}))
        ax.set_xticklabels([str(p) for p in sorted({r["devices"] for r in rows})])
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.set_xlabel("devices P (vocabulary split P ways)")
        ax.set_ylabel("MiB")
        ax.set_title(title)
    axes[0].legend(title="dotted: ideal 1/P")
    fig.suptitle(f"vocab-parallel training step, N={n} rows, V={v} classes, float32")
    _common.save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="N, examples (tokens)")
    parser.add_argument("--classes", type=int, default=32768, help="V, classes (vocabulary)")
    parser.add_argument("--dim", type=int, default=512, help="D, hidden size of the linear head")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=128,
        help="rows per chunk of the linear head, the same for every P (0: chunk_size=None)",
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--check", action="store_true", help="also run and compare with P=1")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)
    available = len(device_pool(max(args.devices)))
    if max(args.devices) > available:
        parser.error(f"--devices: only {available} devices are available")
    if any(args.classes % p for p in args.devices):
        parser.error("--classes: must be divisible by every device count")

    chunk_size = args.chunk_size or None
    rows = measure(args.devices, args.rows, args.classes, args.dim, chunk_size, args.check)
    print_table(rows)
    out = _common.results_dir(args.out)
    _common.write_json(
        out / "bench_sharded.json",
        {
            "config": {
                "rows": args.rows,
                "classes": args.classes,
                "dim": args.dim,
                "linear_chunk_size": chunk_size,
                "dtype": "float32",
                "step": "value_and_grad of the mean loss",
            },
            "platform": {
                "jax": jax.__version__,
                "device_kind": device_pool(max(args.devices))[0].device_kind,
                "device_count": available,
                "machine": platform.machine(),
            },
            "rows": rows,
        },
    )
    plot(rows, out / "bench_sharded.png", args.rows, args.classes)
    print(f"wrote {out / 'bench_sharded.json'} and {out / 'bench_sharded.png'}")


if __name__ == "__main__":
    main()
