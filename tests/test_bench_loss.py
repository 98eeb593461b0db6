"""Smoke test of experiments/bench_loss.py: it runs, and reports what it claims to measure."""

from __future__ import annotations

from tests.scripts import load_script


def test_bench_loss_quick_writes_every_ratio_and_the_floor(tmp_path):
    result = load_script("bench_loss").main(
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
    result = load_script("bench_loss").main(
        ["--shapes", "16x384", "--pairs", "1", "--dtypes", "float32", "--out", str(tmp_path)]
    )
    assert {tuple(r["shape"]) for r in result["rows"]} == {(16, 384)}
