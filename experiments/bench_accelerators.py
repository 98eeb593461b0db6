"""What XLA's TPU and GPU compilers make of jsoftmax, without a TPU or a GPU.

XLA compiles for a device that is not there when JAX is given its description: a TPU v5e
(``libtpu``, from ``pip install -e ".[tpu-aot]"``) and an H100 (the CUDA plugin, from
``pip install -e ".[gpu-aot]"``, with the target description in
``shared/xla_targets/h100_sxm.txtpb`` beside the repository, or ``--target-config``). For each
program this compiles jsoftmax's version and the function a user would otherwise call (optax,
``jax.nn``) for one device, from shapes alone, and reads what the compiler planned:

* **bytes**: HBM traffic. On TPU, ``cost_analysis()["bytes accessed"]`` (exact for programs
  without loops). XLA:GPU has no byte count, so on the H100 it is the *kernel I/O*: for every
  kernel of the optimized program's ``ENTRY`` computation (fusions, library calls, copies), the
  sizes of its distinct operands plus its outputs. It is an upper bound (a kernel that gathers
  one entry per row is charged its whole operand), applied alike to both programs.
* **temporaries**: ``memory_analysis().temp_size_in_bytes``, the scratch memory besides
  arguments and outputs.
* **float32 copies**: for 16-bit logits, the ``ENTRY`` instructions that produce a float32
  array of the logits' shape (a widened copy of the logits written to HBM); the targets ask
  for none ("n/a" for float32 logits, whose gradient is such an array).

Targets, per program: bytes at most 1.05x the peer's, temporaries at most the peer's + 1 MiB,
and no float32 copy of 16-bit logits. Programs: ``jax.value_and_grad`` (with respect to the
logits, ``reduction="mean"``) of ``fused_cross_entropy`` and ``cross_entropy`` with integer and
soft labels, plain, with label smoothing 0.1 and with z-loss 1e-4, against optax (smoothing via
``optax.smooth_labels``, z-loss as ``c * jax.nn.logsumexp(z) ** 2``); ``softmax``,
``log_softmax`` and ``logsumexp`` (last axis) against ``jax.nn``. The linear head's
``value_and_grad`` (with respect to ``x`` and ``w``) is compared with the naive head
(``x @ w`` then optax) on temporaries only: cost analysis does not see inside its loop.

Nothing here times anything: wall-clock time on an accelerator is not measured.

    python experiments/bench_accelerators.py                  # both compilers, full table
    python experiments/bench_accelerators.py --platforms tpu --quick

Writes ``bench_accelerators.json`` and ``bench_accelerators.png`` under
``experiments/results/`` (or ``--out``) and prints a table per compiler.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Without a GPU the CUDA plugin's version check cannot pass, and the plugin then does not
# register, so the deviceless compiler is missing too. The check guards running on a GPU, which
# nothing here does.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import pyplot, results_dir, save_figure, write_json  # noqa: E402

import jsoftmax as jsm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_CONFIG_NAME = Path("shared", "xla_targets", "h100_sxm.txtpb")


def default_target_config() -> Path | None:
    """``shared/xla_targets/h100_sxm.txtpb`` in the repository or in a folder above it."""
    for folder in (REPO, *list(REPO.parents)[:3]):
        if (folder / TARGET_CONFIG_NAME).is_file():
            return folder / TARGET_CONFIG_NAME
    return None


SHAPES = [(8192, 32768), (1024, 131072)]
QUICK_SHAPES = [(1024, 32768)]
DTYPES = ("float32", "bfloat16")
LINEAR_SHAPES = [(8192, 2048, 32768), (4096, 2048, 131072)]  # (N, D, V)
QUICK_LINEAR_SHAPES = [(1024, 512, 32768)]
BYTES_TARGET = 1.05  # ours / peer
TEMP_SLACK = 2**20  # bytes of temporaries allowed above the peer's
SMOOTHING, Z_LOSS = 0.1, 1e-4
COMPILERS = {"tpu": "TPU v5e (libtpu)", "gpu": "H100 SXM (XLA:GPU)"}


# ------------------------------------------------------------------------------ the programs


def _optax():
    import optax

    return optax


def _peer_loss(labels: str, option: str) -> Callable:
    def loss(z, y):
        optax = _optax()
        if labels == "int" and option != "smoothing":
            rows = optax.softmax_cross_entropy_with_integer_labels(z, y)
        else:
            target = jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype) if labels == "int" else y
            if option == "smoothing":
                target = optax.smooth_labels(target, SMOOTHING)
            rows = optax.softmax_cross_entropy(z, target)
        if option == "z_loss":
            rows = rows + Z_LOSS * jax.nn.logsumexp(z, axis=-1) ** 2
        return jnp.mean(rows)

    return loss


def _our_loss(name: str, option: str) -> Callable:
    fn = getattr(jsm, name)
    kw = {"smoothing": {"label_smoothing": SMOOTHING}, "z_loss": {"z_loss": Z_LOSS}}.get(option, {})

    def loss(z, y):
        return fn(z, y, reduction="mean", **kw)

    return loss


def programs() -> list[dict]:
    """Every measured program: a name, a group, and (ours, peer) builders of jittable fns."""
    out = []
    for loss in ("fused_cross_entropy", "cross_entropy"):
        for labels in ("int", "soft"):
            for option in ("plain", "smoothing", "z_loss"):
                out.append(
                    {
                        "program": f"value_and_grad {loss} {labels} {option}",
                        "group": "loss",
                        "labels": labels,
                        "ours": jax.value_and_grad(_our_loss(loss, option)),
                        "peer": jax.value_and_grad(_peer_loss(labels, option)),
                        "peer_id": f"optax {labels} {option}",
                        "peer_name": "optax",
                    }
                )
    for name in ("softmax", "log_softmax", "logsumexp"):
        ours = getattr(jsm, name)
        peer = getattr(jax.nn, name)
        out.append(
            {
                "program": name,
                "group": "normalizer",
                "labels": None,
                "ours": functools.partial(ours, axis=-1),
                "peer": functools.partial(peer, axis=-1),
                "peer_id": name,
                "peer_name": "jax.nn",
            }
        )
    return out


# ------------------------------------------------------------------------------ the compilers


def extras_missing(kind: str) -> str | None:
    """Why the ``kind`` ("tpu" or "gpu") compiler cannot run here, or None if it can."""
    if kind == "tpu" and importlib.util.find_spec("libtpu") is None:
        return 'libtpu is not installed (pip install -e ".[tpu-aot]")'
    if kind == "gpu":
        if importlib.util.find_spec("jax_cuda12_plugin") is None:
            return 'the CUDA plugin is not installed (pip install -e ".[gpu-aot]")'
        if default_target_config() is None:
            return f"no GPU target description: {TARGET_CONFIG_NAME} not found near {REPO}"
    return None


def topology(kind: str, target_config: str | os.PathLike | None = None):
    """A one-device description of a TPU v5e or an H100 for deviceless compilation."""
    from jax.experimental import topologies

    if kind == "tpu":
        return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    path = Path(target_config) if target_config else default_target_config()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"--target-config: no GPU target description at {path or TARGET_CONFIG_NAME}"
        )
    return topologies.get_topology_desc(
        platform="cuda", target_config=path.read_text(), topology="1x1x1"
    )


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_NOT_KERNELS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape: ``f32[8,4]{1,0}`` or a tuple ``(f32[8]{0}, s32[])``."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        count = math.prod(int(d) for d in dims.split(",") if d)
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def _split_shape(rhs: str) -> tuple[str, str]:
    """``"(f32[2]{0}, f32[2]{0}) fusion(%a), kind=..."`` -> (shape, rest)."""
    if rhs.startswith("("):
        depth = 0
        for i, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rhs[: i + 1], rhs[i + 1 :].strip()
    shape, _, rest = rhs.partition(" ")
    return shape, rest


def entry_instructions(hlo_text: str) -> list[dict]:
    """The instructions of the ``ENTRY`` computation: name, shape, opcode, operand names."""
    start = hlo_text.index("\nENTRY")
    body = hlo_text[start:].split("\n")[1:]
    out = []
    for line in body:
        if line.startswith("}"):
            break
        line = line.strip()
        if " = " not in line:
            continue
        lhs, rhs = line.split(" = ", 1)
        name = lhs.replace("ROOT", "").strip().lstrip("%")
        shape, rest = _split_shape(rhs)
        opcode = rest.split("(", 1)[0].strip()
        depth, args = 0, ""
        for ch in rest[len(opcode) :]:
            depth += ch == "("
            depth -= ch == ")"
            args += ch
            if depth == 0 and args:
                break
        operands = re.findall(r"%([\w.\-]+)", args)
        out.append(
            {
                "name": name,
                "shape": shape,
                "opcode": opcode,
                "operands": operands,
                "root": lhs.startswith("ROOT"),
            }
        )
    return out


def kernel_io_bytes(hlo_text: str) -> int:
    """Sum over the ``ENTRY`` kernels of their distinct operands' and their outputs' bytes."""
    instructions = entry_instructions(hlo_text)
    shapes = {i["name"]: i["shape"] for i in instructions}
    total = 0
    for inst in instructions:
        if inst["opcode"] in _NOT_KERNELS:
            continue
        total += _shape_bytes(inst["shape"])
        total += sum(_shape_bytes(shapes.get(op, "")) for op in dict.fromkeys(inst["operands"]))
    return total


def float32_copies(hlo_text: str, shape: tuple[int, ...]) -> int:
    """``ENTRY`` instructions (not parameters) that write a float32 array of ``shape``."""
    dims = ",".join(str(d) for d in shape)
    pattern = re.compile(rf"\bf32\[{dims}\]")
    return sum(
        1
        for inst in entry_instructions(hlo_text)
        if inst["opcode"] not in _NOT_KERNELS and pattern.search(inst["shape"])
    )


def measure(fn: Callable, args: tuple, kind: str, logits_shape: tuple[int, ...]) -> dict:
    """Compile ``jax.jit(fn)`` for ``args`` (ShapeDtypeStructs placed on the target device)."""
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    if kind == "tpu":
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        nbytes = float(cost["bytes accessed"])
    else:
        nbytes = float(kernel_io_bytes(text))
    mem = compiled.memory_analysis()
    return {
        "bytes": nbytes,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "float32_copies": float32_copies(text, logits_shape),
    }


def meets_targets(row: dict) -> bool:
    """The targets of one row (see the module docstring)."""
    ok = row["bytes_ratio"] <= BYTES_TARGET
    ok = ok and row["ours"]["temp_bytes"] <= row["peer"]["temp_bytes"] + TEMP_SLACK
    if row["dtype"] != "float32":
        ok = ok and row["ours"]["float32_copies"] == 0
    return ok


# Where a program stays above the targets, and by how much at most: (compiler, program prefix)
# -> (bytes ratio bound, extra GPU row-sum partials, why). The docs give the same reasons.
EXCEPTIONS = {
    ("tpu", "value_and_grad cross_entropy int plain"): (1.25, 0, "reference: dense target"),
    ("tpu", "value_and_grad cross_entropy int z_loss"): (1.25, 0, "reference: dense target"),
    ("gpu", "value_and_grad cross_entropy int smoothing"): (1.26, 2, "gather charged whole"),
    ("gpu", "value_and_grad cross_entropy soft"): (1.18, 2, "reference: extra pass"),
    ("gpu", "value_and_grad cross_entropy int"): (BYTES_TARGET, 1, "row-sum partials"),
    ("gpu", "value_and_grad fused_cross_entropy int smoothing"): (1.26, 2, "gather charged whole"),
    ("gpu", "value_and_grad fused_cross_entropy soft"): (BYTES_TARGET, 3, "row-sum partials"),
    ("gpu", "log_softmax"): (BYTES_TARGET, 1, "row-sum partials"),
    ("gpu", "logsumexp"): (BYTES_TARGET, 2, "row-sum partials"),
}


def gpu_partial_bytes(rows: int, classes: int) -> int:
    """The float32 ``[rows, P]`` partial sums XLA:GPU splits a row sum into when a row is wider
    than 16384 (P = 128 at 32768 classes, 256 at 131072: measured), else 0."""
    if classes <= 16384:
        return 0
    return rows * 2 ** int(math.log2(math.sqrt(classes))) * 4


def exception(row: dict) -> tuple[float, int, str] | None:
    """The documented exception that covers a row, if any (the longest matching prefix)."""
    found = [
        (len(program), bound)
        for (kind, program), bound in EXCEPTIONS.items()
        if kind == row["kind"] and row["program"].startswith(program)
    ]
    return max(found)[1] if found else None


def within_bounds(row: dict) -> bool:
    """The targets, or the documented exception's bounds where one covers the row."""
    if row["meets_targets"]:
        return True
    covered = exception(row)
    if covered is None:
        return False
    bytes_bound, partials, _ = covered
    n, c = row["shape"]
    temp_bound = row["peer"]["temp_bytes"] + TEMP_SLACK + partials * gpu_partial_bytes(n, c)
    ok = row["bytes_ratio"] <= bytes_bound and row["ours"]["temp_bytes"] <= temp_bound
    return ok and (row["dtype"] == "float32" or row["ours"]["float32_copies"] == 0)


def run_compiler(kind: str, shapes, dtypes, target_config=None, selected=None, log=print):
    """Rows for one compiler: every program at every shape and dtype."""
    topo = topology(kind, target_config)
    device = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    rows = []
    peer_cache: dict = {}
    progs = [p for p in programs() if selected is None or p["program"] in selected]
    for n, c in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            z = jax.ShapeDtypeStruct((n, c), dtype, sharding=sharding)
            ints = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)
            for prog in progs:
                args = (
                    (z,) if prog["labels"] is None else (z, ints if prog["labels"] == "int" else z)
                )
                t0 = time.perf_counter()
                ours = measure(prog["ours"], args, kind, (n, c))
                # Both losses share a peer: compile it once per shape and dtype.
                peer_id = (prog["peer_id"], n, c, dtype_name)
                if peer_id not in peer_cache:
                    peer_cache[peer_id] = measure(prog["peer"], args, kind, (n, c))
                peer = peer_cache[peer_id]
                if dtype_name == "float32":  # the gradient itself is a float32 array there
                    ours = {**ours, "float32_copies": None}
                    peer = {**peer, "float32_copies": None}
                row = {
                    "compiler": COMPILERS[kind],
                    "kind": kind,
                    "program": prog["program"],
                    "group": prog["group"],
                    "shape": [n, c],
                    "dtype": dtype_name,
                    "peer_name": prog["peer_name"],
                    "ours": ours,
                    "peer": peer,
                    "bytes_ratio": ours["bytes"] / peer["bytes"],
                    "temp_excess_mib": (ours["temp_bytes"] - peer["temp_bytes"]) / 2**20,
                }
                row["meets_targets"] = meets_targets(row)
                row["within_bounds"] = within_bounds(row)
                rows.append(row)
                log(
                    f"  {kind} {prog['program']} {n}x{c} {dtype_name}: "
                    f"{row['bytes_ratio']:.3f}x bytes, +{row['temp_excess_mib']:.1f} MiB "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
    return rows


def naive_head(x, w, labels):
    return jnp.mean(_optax().softmax_cross_entropy_with_integer_labels(x @ w, labels))


def chunked_head(x, w, labels):
    return jsm.linear_cross_entropy(x, w, labels)


def run_linear(kind: str, shapes, dtypes, target_config=None, log=print):
    """The linear head against the naive one: temporaries of value_and_grad wrt (x, w)."""
    topo = topology(kind, target_config)
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    rows = []
    for n, d, v in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            args = (
                jax.ShapeDtypeStruct((n, d), dtype, sharding=sharding),
                jax.ShapeDtypeStruct((d, v), dtype, sharding=sharding),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
            )
            out = {}
            for name, fn in (("ours", chunked_head), ("naive", naive_head)):
                compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
                out[name] = int(compiled.memory_analysis().temp_size_in_bytes)
            rows.append(
                {
                    "compiler": COMPILERS[kind],
                    "kind": kind,
                    "program": "value_and_grad linear_cross_entropy",
                    "shape": [n, d, v],
                    "dtype": dtype_name,
                    "ours_temp_mib": out["ours"] / 2**20,
                    "naive_temp_mib": out["naive"] / 2**20,
                    "logits_f32_mib": n * v * 4 / 2**20,
                }
            )
            log(
                f"  {kind} linear {n}x{d}x{v} {dtype_name}: {out['ours'] / 2**20:.0f} MiB "
                f"vs naive {out['naive'] / 2**20:.0f} MiB"
            )
    return rows


# ------------------------------------------------------------------------------ output


def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _copies(row) -> str:
    copies = row["ours"]["float32_copies"]
    return "n/a" if copies is None else str(copies)


def _verdict(row) -> str:
    if row["meets_targets"]:
        return "yes"
    covered = exception(row)
    return f"above ({covered[2]})" if row["within_bounds"] else "NO"


def markdown(rows, linear_rows) -> str:
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        unit = "HBM MiB" if kind == "tpu" else "kernel I/O MiB"
        lines += [
            f"**{COMPILERS[kind]}**",
            "",
            f"| program | shape | dtype | ours ({unit}) | peer | bytes ratio | "
            "temp ours / peer (MiB) | f32 copies | target |",
            "|---|---|---|---:|---|---:|---:|---:|---|",
        ]
        for r in rows:
            if r["kind"] != kind:
                continue
            lines.append(
                f"| {r['program']} | {r['shape'][0]}×{r['shape'][1]} | {r['dtype']} | "
                f"{_mib(r['ours']['bytes'])} | {r['peer_name']} {_mib(r['peer']['bytes'])} | "
                f"{r['bytes_ratio']:.3f} | {r['ours']['temp_bytes'] / 2**20:.1f} / "
                f"{r['peer']['temp_bytes'] / 2**20:.1f} | {_copies(r)} | "
                f"{_verdict(r)} |"
            )
        lines.append("")
    if linear_rows:
        lines += ["**Linear head, value_and_grad wrt (x, w): temporaries**", ""]
        lines += linear_table(linear_rows)
    return "\n".join(lines)


def linear_table(linear_rows) -> list[str]:
    """The linear head's rows as a markdown table (also rendered into the docs)."""
    lines = [
        "| compiler | N×D×V | dtype | jsoftmax (MiB) | naive (MiB) | f32 logits (MiB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in linear_rows:
        n, d, v = r["shape"]
        lines.append(
            f"| {r['compiler']} | {n}×{d}×{v} | {r['dtype']} | {r['ours_temp_mib']:.0f} | "
            f"{r['naive_temp_mib']:.0f} | {r['logits_f32_mib']:.0f} |"
        )
    return lines


def plot(rows, path) -> None:
    plt = pyplot()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    fig, axes = plt.subplots(
        len(kinds), 1, figsize=(max(12, 0.32 * len(rows) / max(len(kinds), 1)), 5.5 * len(kinds))
    )
    axes = [axes] if len(kinds) == 1 else list(axes)
    for ax, kind in zip(axes, kinds, strict=True):
        sel = [r for r in rows if r["kind"] == kind]
        ratios = [r["bytes_ratio"] for r in sel]
        colors = [
            "tab:green" if r["meets_targets"] else "tab:orange" if r["within_bounds"] else "tab:red"
            for r in sel
        ]
        ax.bar(range(len(sel)), ratios, color=colors)
        ax.axhline(1.0, color="k", lw=1)
        ax.axhline(BYTES_TARGET, color="k", lw=1, ls="--")
        labels = [
            f"{r['program'].replace('value_and_grad ', 'vg ').replace('_cross_entropy', '')} "
            f"{r['shape'][0]}×{r['shape'][1]} {'bf16' if r['dtype'] == 'bfloat16' else 'f32'}"
            for r in sel
        ]
        ax.set_xticks(range(len(sel)), labels, fontsize=6, rotation=75, ha="right")
        what = "HBM bytes" if kind == "tpu" else "kernel I/O bytes"
        ax.set_ylabel(f"{what}: jsoftmax / peer")
        ax.set_title(
            f"{COMPILERS[kind]}: {what} against optax / jax.nn (dashed: target 1.05). Green: "
            "every target met; orange: above one (bytes or temporaries), within its documented "
            "bound; red: outside it"
        )
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platforms", default="tpu,gpu", help="comma-separated: tpu, gpu")
    parser.add_argument(
        "--target-config",
        default=None,
        help="the GPU target description (default: shared/xla_targets/h100_sxm.txtpb in the "
        "repository or a folder above it)",
    )
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    parser.add_argument("--no-linear", action="store_true", help="skip the linear head")
    parser.add_argument("--out", default=None, help="output directory (default results/)")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.platforms.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in COMPILERS]
    if unknown or not kinds:
        parser.error(f"--platforms: expected among tpu,gpu, got {args.platforms!r}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    linear_shapes = QUICK_LINEAR_SHAPES if args.quick else LINEAR_SHAPES
    rows, linear_rows, skipped = [], [], {}
    for kind in kinds:
        reason = extras_missing(kind)
        if reason is not None:
            print(f"{kind}: skipped: {reason}", file=sys.stderr)
            skipped[kind] = reason
            continue
        print(f"{COMPILERS[kind]}:", file=sys.stderr)
        log = functools.partial(print, file=sys.stderr, flush=True)
        rows += run_compiler(kind, shapes, dtypes, args.target_config, log=log)
        if not args.no_linear:
            linear_rows += run_linear(kind, linear_shapes, dtypes, args.target_config, log=log)
    table = markdown(rows, linear_rows)
    result = {
        "machine": {"platform": platform.platform(), "jax": jax.__version__},
        "targets": {"bytes_ratio": BYTES_TARGET, "temp_slack_bytes": TEMP_SLACK},
        "skipped": skipped,
        "rows": rows,
        "linear": linear_rows,
        "markdown": table,
    }
    out = results_dir(args.out)
    write_json(os.path.join(out, "bench_accelerators.json"), result)
    if rows:
        plot(rows, os.path.join(out, "bench_accelerators.png"))
    print(table)
    return result


if __name__ == "__main__":
    main()
