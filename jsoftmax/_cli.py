"""Command line: ``python -m jsoftmax verify`` (also installed as ``jsoftmax-verify``).

Runs the Jacobian-equivalence suite of :mod:`jsoftmax._verify_suite` on every device JAX
reports, prints one table row per device, function, dtype and derivation, and exits with
status 1 if any check failed (2 for a usage error). ``--portable`` runs it on the portable
formulation (:mod:`jsoftmax._portable`, what GPU and TPU programs carry) on the devices here,
so that a machine without an accelerator checks it too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

_DTYPES = ("float32", "bfloat16", "float64")
_COLUMNS = (
    ("device", "device"),
    ("function", "function"),
    ("dtype", "dtype"),
    ("derivation", "derivation"),
    ("max abs error", "max_abs_error"),
    ("max rel error", "max_rel_error"),
    ("result", "passed"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if key == "passed":
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table, one line per row under a header."""
    header = [title for title, _ in _COLUMNS]
    body = [[_cell(row, key) for _, key in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(rows: Sequence[dict[str, Any]], seconds: float) -> tuple[str, int]:
    """The one-line summary and the exit status: 0 when every row passed, else 1."""
    failed = [r for r in rows if not r["passed"]]
    devices = sorted({r["device"] for r in rows})
    where = f"{len(devices)} device{'s' if len(devices) != 1 else ''} ({', '.join(devices)})"
    if not rows:
        return f"verify: FAILED: no checks ran ({seconds:.1f} s)", 1
    if failed:
        return (
            f"verify: FAILED: {len(failed)} of {len(rows)} rows failed on {where} ({seconds:.1f} s)"
        ), 1
    return f"verify: all {len(rows)} rows passed on {where} ({seconds:.1f} s)", 0


def _json_number(value: Any) -> Any:
    # JSON has no inf/NaN: a non-finite error (a crash, or NaN where a number was expected)
    # is written as null, and the row's "passed" is false.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(
    path: str, rows: Sequence[dict[str, Any]], summary: str, failures: Sequence[str]
) -> None:
    clean = [{k: _json_number(v) for k, v in row.items()} for row in rows]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"rows": clean, "summary": summary, "failures": list(failures)},
            f,
            indent=1,
            allow_nan=False,
        )
        f.write("\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Checks of jsoftmax's derivatives on every available device."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify",
        help="run the Jacobian-equivalence suite",
        description=(
            "Compares the derivatives of every public function with closed forms, jax.jacrev, "
            "jax.jacfwd, finite differences (float64 only) and Hessians, on every device that "
            "jax.devices() reports. Exits with status 1 if any check fails."
        ),
    )
    verify.add_argument("--json", metavar="PATH", help='also write {"rows": [...]} to PATH')
    verify.add_argument(
        "--device",
        choices=("cpu", "gpu", "tpu"),
        help="the platform to run on (default: JAX's default backend)",
    )
    verify.add_argument(
        "--dtype",
        metavar="LIST",
        help="comma-separated dtypes among float32,bfloat16,float64 (default: float32,bfloat16 "
        "and float64 when JAX_ENABLE_X64=1); naming float64 turns x64 on",
    )
    verify.add_argument(
        "--function", nargs="+", metavar="NAME", help="only these public functions (default: all)"
    )
    verify.add_argument(
        "--portable",
        action="store_true",
        help="check the portable formulation, the one GPU and TPU programs carry, on every "
        "device here (CPU included) instead of each backend's own",
    )
    return parser


def _parse_dtypes(value: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if value is None:
        return []
    dtypes = [d.strip() for d in value.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in _DTYPES]
    if unknown or not dtypes:
        parser.error(
            f"--dtype: expected a comma-separated list of {', '.join(_DTYPES)}, got {value!r}"
        )
    return dtypes


def verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    dtypes = _parse_dtypes(args.dtype, parser)
    import jax

    if "float64" in dtypes:
        jax.config.update("jax_enable_x64", True)
    if not dtypes:
        dtypes = ["float32", "bfloat16"] + (["float64"] if jax.config.jax_enable_x64 else [])

    from . import _verify_suite as suite

    available = suite.available_functions()
    functions = list(args.function or available)
    for name in functions:
        if name not in suite.FUNCTIONS:
            parser.error(
                f"--function: unknown function {name!r}; expected among "
                f"{', '.join(suite.FUNCTIONS)}"
            )
        if name not in available:
            parser.error(f"--function: {name!r} is not available in this version of jsoftmax")
    try:
        devices = jax.devices(args.device) if args.device else jax.devices()
    except RuntimeError as error:
        print(f"verify: no {args.device} device: {error}", file=sys.stderr)
        return 2

    from ._platform import force_portable

    start = time.perf_counter()
    formulation = "portable" if args.portable else "native"
    with force_portable() if args.portable else contextlib.nullcontext():
        rows, failures = suite.run_suite(
            devices,
            dtypes,
            functions,
            progress=lambda msg: print(f"  checking {msg}", file=sys.stderr, flush=True),
        )
    for row in rows:
        row["formulation"] = formulation
    summary, status = summarize(rows, time.perf_counter() - start)
    if args.portable:
        summary += " [portable formulation]"
    print(format_table(rows))
    if failures:
        print("\nFailures:")
        for failure in failures:
            print(f"- {failure}")
    print()
    print(summary)
    if args.json:
        write_json(args.json, rows, summary, failures)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m jsoftmax`` and of the ``jsoftmax-verify`` script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    invoked_as = os.path.basename(sys.argv[0]) if sys.argv else ""
    if invoked_as.startswith("jsoftmax-verify"):
        # The script is the verify command itself.
        argv = ["verify", *argv]
        prog = "jsoftmax-verify"
    else:
        prog = "python -m jsoftmax"
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify(args, parser)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks it
    return 2
