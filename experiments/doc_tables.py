"""The documentation's generated tables, rendered from what the experiments wrote.

Each table sits in a page under ``docs/`` between the lines ``<!-- begin generated: NAME -->``
and ``<!-- end generated: NAME -->`` (see :data:`TABLES`). Its body is rendered from a results
file under ``experiments/results/`` (or, for the bad-input table, from the test cases in
``tests/bad_inputs_table.py``), so a page shows what the last run measured and nothing else.
Nothing is timed or recomputed here: rerun an experiment first, then write its table.

Usage::

    python experiments/doc_tables.py                   # say which tables are up to date
    python experiments/doc_tables.py --write           # rewrite every table from its source
    python experiments/doc_tables.py --write accuracy  # only the named tables
    python experiments/doc_tables.py --check           # exit 1 if a page differs (the tests)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
DOCS = REPO / "docs"
MiB = 2**20

if str(REPO / "experiments") not in sys.path:
    sys.path.insert(0, str(REPO / "experiments"))

import _generated  # noqa: E402


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _note(source: str, name: str) -> str:
    return (
        f"<!-- rendered from {source} by `python experiments/doc_tables.py --write {name}`; "
        "edit the source, not this table -->"
    )


def _accuracy() -> str:
    return (
        _note("experiments/results/accuracy.json", "accuracy")
        + "\n\n"
        + _load("accuracy")["markdown"]
    )


def _bench_loss() -> str:
    data = _load("bench_loss")
    m = data["machine"]
    where = f"{m['device_kind']} ({m['cpu_count']} cores, {m['platform']}, jax {m['jax']})"
    return "\n\n".join(
        [
            _note("experiments/results/bench_loss.json", "bench-loss"),
            f"Measured on {where}, median of {data['pairs']} interleaved pairs:",
            data["markdown"],
        ]
    )


def _bench_linear() -> str:
    data = _load("bench_linear")
    m = data["machine"]
    heads = ("naive", "tokamax", "jsoftmax")
    titles = {
        "naive": "naive (x @ w + optax)",
        "tokamax": "tokamax chunked_xla",
        "jsoftmax": "jsoftmax",
    }

    def mib(cell: dict | None) -> str:
        return "—" if cell is None else f"{cell['peak_mib']:,.1f} ({cell['temp_mib']:,.1f})"

    where = f"Python {m['python']}, jax {m['jax']}, tokamax {m['tokamax'] or '—'}, {m['platform']}"
    parts = [
        _note("experiments/results/bench_linear.json", "bench-linear"),
        f"Measured with {where}. Peak memory of `value_and_grad` wrt `(x, w)`, mean, float32, "
        "MiB: temporaries + outputs (temporaries in parentheses):",
    ]
    lines = ["| (N, D, V) | " + " | ".join(titles[h] for h in heads) + " | schedule |"]
    lines.append("|---|" + "---:|" * len(heads) + "---|")
    for r in data["memory"]["required"]:
        cells = " | ".join(mib(r.get(h)) for h in heads)
        lines.append(f"| ({r['tokens']}, {r['dim']}, {r['vocab']}) | {cells} | {r['schedule']} |")
    parts.append("\n".join(lines))
    if data["time"]:
        rounds = data["time"][0]["rounds"]
        parts.append(
            f"Time of `value_and_grad` (median of {rounds} interleaved rounds, seconds) and "
            "jsoftmax's speedup over each peer (median per-round ratio; wall / CPU time):"
        )
        peers = [h for h in heads if h != "jsoftmax" and h in data["time"][0]["median_seconds"]]
        lines = [
            "| (N, D, V) | dtype | "
            + " | ".join(h for h in heads if h in data["time"][0]["median_seconds"])
            + " | "
            + " | ".join(f"vs {h}" for h in peers)
            + " |"
        ]
        lines.append("|---|---|" + "---:|" * (len(peers) + 1 + len(peers)))
        for t in data["time"]:
            secs = " | ".join(
                f"{t['median_seconds'][h]:.3f}" for h in heads if h in t["median_seconds"]
            )
            ratios = " | ".join(
                f"{t['jsoftmax_speedup'][h]:.2f}x / {t['jsoftmax_cpu_speedup'][h]:.2f}x"
                for h in peers
            )
            shape = f"({t['tokens']}, {t['dim']}, {t['vocab']})"
            lines.append(f"| {shape} | {t['dtype']} | {secs} | {ratios} |")
        parts.append("\n".join(lines))
    if data["train_lm"]:
        parts.append(
            "Peak memory of one training step of `experiments/train_lm.py` (model and AdamW "
            "update; MiB, temporaries in parentheses):"
        )
        lines = ["| batch | " + " | ".join(titles[h] for h in heads) + " |"]
        lines.append("|---:|" + "---:|" * len(heads))
        for batch, step in data["train_lm"].items():
            cells = " | ".join(mib(step["heads"].get(h)) for h in heads)
            lines.append(f"| {int(batch):,} | {cells} |")
        parts.append("\n".join(lines))
    if data.get("tokamax_missing"):
        parts.append(f"No tokamax column: {data['tokamax_missing']}")
    return "\n\n".join(parts)


def _bench_sharded() -> str:
    data = _load("bench_sharded")
    cfg = data["config"]
    columns = {
        "fused / shard_map": "`fused_cross_entropy`, `shard_map`",
        "fused / jit": "`fused_cross_entropy`, `jit`",
        "reference / shard_map": "`cross_entropy`, `shard_map`",
        "linear / shard_map": (
            f"`linear_cross_entropy`, `shard_map` (D = {cfg['dim']}, "
            f"chunk {cfg['linear_chunk_size']})"
        ),
    }
    cells: dict[int, dict[str, str]] = {}
    for row in data["rows"]:
        cell = f"{row['total_bytes'] / MiB:.1f} MiB ({row['temp_bytes'] / MiB:.1f})"
        cells.setdefault(row["devices"], {})[row["program"]] = cell
    programs = [p for p in columns if any(p in c for c in cells.values())]
    lines = [
        "| P | " + " | ".join(columns[p] for p in programs) + " |",
        "|---:|" + "---:|" * len(programs),
    ]
    for devices in sorted(cells):
        row = cells[devices]
        lines.append(f"| {devices} | " + " | ".join(row.get(p, "—") for p in programs) + " |")
    return (
        _note("experiments/results/bench_sharded.json", "bench-sharded") + "\n\n" + "\n".join(lines)
    )


def _bench_accelerators() -> str:
    data = _load("bench_accelerators")
    compilers = {"tpu": "TPU v5e", "gpu": "H100"}
    cells: dict[tuple, dict[tuple, str]] = {}
    shapes: list[tuple] = []
    for row in data["rows"]:
        shape = tuple(row["shape"])
        if shape not in shapes:
            shapes.append(shape)
        temp = row["ours"]["temp_bytes"] / MiB
        peer_temp = row["peer"]["temp_bytes"] / MiB
        mark = "" if row["meets_targets"] else " †"
        cell = f"{row['bytes_ratio']:.3f} ({temp:.1f} / {peer_temp:.1f}){mark}"
        key = (row["program"].removeprefix("value_and_grad "), row["peer_name"])
        cells.setdefault(shape, {}).setdefault(key, {})[(row["kind"], row["dtype"])] = cell
    columns = [(k, d) for k in compilers for d in ("float32", "bfloat16")]
    parts = [
        _note("experiments/results/bench_accelerators.json", "bench-accelerators"),
        f"Compiled with jax {data['machine']['jax']} for one device, nothing run. Each cell: "
        "bytes ratio (TPU: HBM bytes; H100: kernel I/O) against the peer, then temporaries "
        "ours / peer in MiB; † marks a program above the targets (bytes at most "
        f"{data['targets']['bytes_ratio']}x the peer's, temporaries at most the peer's + "
        f"{data['targets']['temp_slack_bytes'] / MiB:.0f} MiB). Losses are `value_and_grad`, "
        "mean, with respect to the logits.",
    ]
    for shape in shapes:
        lines = [
            f"**[{shape[0]}, {shape[1]}]**",
            "",
            "| program | peer | " + " | ".join(f"{compilers[k]} {d}" for k, d in columns) + " |",
            "|---|---|" + "---:|" * len(columns),
        ]
        for (program, peer), by_col in cells[shape].items():
            lines.append(
                f"| {program} | {peer} | " + " | ".join(by_col.get(c, "—") for c in columns) + " |"
            )
        parts.append("\n".join(lines))
    linear = data.get("linear") or []
    if linear:
        from bench_accelerators import linear_table

        intro = (
            "Linear head, `value_and_grad` with respect to `(x, w)`: temporaries (MiB) against "
            "the naive head (`x @ w` then optax); the float32 logits alone would take the last "
            "column."
        )
        parts.append("\n".join([intro, "", *linear_table(linear)]))
    return "\n\n".join(parts)


def _bad_input() -> str:
    import bad_input_table

    return bad_input_table.markdown_table()


@dataclass(frozen=True)
class Table:
    page: str  # relative to docs/
    render: Callable[[], str]


TABLES: dict[str, Table] = {
    "accuracy": Table("accuracy.md", _accuracy),
    "bench-loss": Table("performance.md", _bench_loss),
    "bench-linear": Table("linear-head.md", _bench_linear),
    "bench-sharded": Table("scaling-out.md", _bench_sharded),
    "bench-accelerators": Table("performance.md", _bench_accelerators),
    "bad-input": Table("bad-input.md", _bad_input),
}


def stale(names: list[str] | None = None) -> dict[str, str]:
    """``{name: diff}`` for every table whose page differs from its source."""
    out = {}
    for name in names or TABLES:
        table = TABLES[name]
        difference = _generated.diff(DOCS / table.page, name, table.render())
        if difference:
            out[name] = difference
    return out


def write(names: list[str] | None = None) -> list[str]:
    """Rewrites the named tables (all by default); returns the names of those that changed."""
    changed = []
    for name in names or TABLES:
        page = DOCS / TABLES[name].page
        text = page.read_text()
        new = _generated.replace(text, name, TABLES[name].render(), str(page))
        if new != text:
            page.write_text(new)
            changed.append(name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the tables in docs/")
    mode.add_argument("--check", action="store_true", help="exit 1 if a page's table is stale")
    parser.add_argument("names", nargs="*", help=f"tables among {', '.join(TABLES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in TABLES]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}; choose among {', '.join(TABLES)}")
    names = args.names or None
    if args.write:
        changed = write(names)
        for name in names or TABLES:
            state = "written" if name in changed else "unchanged"
            print(f"docs/{TABLES[name].page}: {name} {state}")
        return 0
    differences = stale(names)
    for name in names or TABLES:
        if name in differences:
            print(differences[name], file=sys.stderr)
            print(f"docs/{TABLES[name].page}: {name} is out of date", file=sys.stderr)
        else:
            print(f"docs/{TABLES[name].page}: {name} is up to date")
    if differences:
        print("run `python experiments/doc_tables.py --write` to update", file=sys.stderr)
    return 1 if differences and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
