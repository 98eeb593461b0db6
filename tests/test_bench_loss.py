"""Smoke test of experiments/bench_loss.py: it runs, and reports what it claims to measure."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load():
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(
        "experiments_bench_loss", EXPERIMENTS / "bench_loss.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_loss_quick_writes_every_ratio_and_the_floor(tmp_path):
    result = _load().main(
        ["--quick", "--pairs", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    )
    rows = result["rows"]
    assert {r["function"] for r in rows} == {"value_and_grad", "softmax", "log_softmax"}
    for r in rows:
        assert r["ours_ms"] > 0 and r["peer_ms"] > 0
        assert r["ratio"] == r["peer_ms"] / r["ours_ms"]
        assert r["ours_hlo"]["fusions"] > 0
    assert all(r["floor_multiple"] > 0 for r in rows if r["function"] == "value_and_grad")
    assert (tmp_path / "bench_loss.json").exists() and (tmp_path / "bench_loss.png").exists()
    assert "| value_and_grad |" in result["markdown"]


def test_bench_loss_takes_shapes(tmp_path):
    result = _load().main(
        ["--shapes", "16x384", "--pairs", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    )
    assert {tuple(r["shape"]) for r in result["rows"]} == {(16, 384)}
