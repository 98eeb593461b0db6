"""Smoke test of experiments/bench_linear.py: it runs, and reports what it claims to measure."""

from __future__ import annotations

import json

from tests.scripts import EXPERIMENTS, load_script


def test_bench_linear_quick_writes_memory_time_and_train_step(tmp_path):
    module = load_script("bench_linear")
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


def _make_variable(name: str) -> list[str]:
    """The words of ``NAME ?= ...`` in the Makefile (continuation lines joined)."""
    text = (EXPERIMENTS.parent / "Makefile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith(f"{name} ?="):
            return line.split("?=", 1)[1].split()
    raise AssertionError(f"{name} is not in the Makefile")


def test_make_bench_device_flags_are_the_scripts_own():
    # `make bench-device` runs on machines this suite never sees: its flags must parse here.
    args = _make_variable("DEVICE_LINEAR")
    parsed = load_script("bench_linear").parser().parse_args(args)
    assert parsed.memory_dim and parsed.memory_vocab and parsed.memory_tokens, args
    assert parsed.time_tokens and parsed.time_dim and parsed.time_vocab, args


def test_bench_linear_takes_other_shapes(tmp_path):
    result = load_script("bench_linear").main(
        ["--quick", "--rounds", "1", "--dtypes", "float32", "--skip-memory", "--out", str(tmp_path)]
        + ["--time-tokens", "64", "--time-dim", "16", "--time-vocab", "300"]
    )
    assert [(t["tokens"], t["dim"], t["vocab"]) for t in result["time"]] == [(64, 16, 300)]
