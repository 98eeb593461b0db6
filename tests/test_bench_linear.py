"""Smoke test of experiments/bench_linear.py: it runs, and reports what it claims to measure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load():
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location(
        "experiments_bench_linear", EXPERIMENTS / "bench_linear.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_linear_quick_writes_memory_time_and_train_step(tmp_path):
    module = _load()
    result = module.main(
        ["--quick", "--rounds", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    )
    heads = ["naive", "jsoftmax"] + (["tokamax"] if module.tokamax is not None else [])
    if module.tokamax is None:  # the column is missing, and the result says why
        assert "Python >= 3.12" in result["tokamax_missing"]
    for key in ("by_tokens", "by_vocab", "required"):
        for row in result["memory"][key]:
            assert all(
                row[h]["peak_mib"] == row[h]["temp_mib"] + row[h]["output_mib"] for h in heads
            )
            assert row["jsoftmax"]["peak_mib"] < row["naive"]["peak_mib"]
    for t in result["time"]:
        assert set(t["jsoftmax_speedup"]) == set(heads) - {"jsoftmax"}
        assert t["agreement_with_naive"]["jsoftmax"]["loss"] < 1e-5
    for step in result["train_lm"].values():
        assert set(step["heads"]) == set(heads)
    saved = json.loads((tmp_path / "bench_linear.json").read_text())
    assert saved["memory"]["required"][0]["schedule"] == "one-pass"
    assert (tmp_path / "bench_linear.png").read_bytes()[:4] == b"\x89PNG"
