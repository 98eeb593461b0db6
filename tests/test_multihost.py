"""Several hosts, run for real: 2 processes with 2 CPU devices each, joined by jax.distributed.

The processes meet on a free localhost port and exchange their collectives through gloo, as
hosts do over a network; the class axis of the mesh runs across them. ``experiments/multihost.py``
starts them (with a time limit, and kills them if it passes) and each checks its shards of the
sharded results against the single-device call.
"""

from __future__ import annotations

from tests.scripts import load_script

CHECKS = {
    "jit fused_cross_entropy (Explicit axes)",
    "jit fused_cross_entropy (Auto axes)",
    "shard_map fused_cross_entropy (axis_name)",
    "shard_map linear_cross_entropy (axis_name)",
}


def test_two_processes_give_the_single_device_values_and_gradients(tmp_path):
    result = load_script("multihost").main(["--timeout", "240", "--out", str(tmp_path)])
    errors = [r.get("error") for r in result["reports"] if "error" in r]
    assert not errors, errors
    assert [r["process"] for r in result["reports"]] == [0, 1]
    for report in result["reports"]:
        assert report["global_devices"] == 4 and report["local_devices"] == 2
        assert {c["check"] for c in report["checks"]} == CHECKS
        failed = [c for c in report["checks"] if not c["passed"]]
        assert not failed, failed
        assert all(c["shards"] > 0 for c in report["checks"])
    assert result["passed"]
    assert (tmp_path / "multihost.json").exists()
