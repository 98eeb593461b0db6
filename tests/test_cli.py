"""Tests for ``python -m jsoftmax verify``: the end-to-end run, the table and the exit status."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jsoftmax as jsm
from jsoftmax import _cli
from jsoftmax import _verify_suite as suite

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"device", "function", "dtype", "derivation", "max_abs_error", "max_rel_error", "passed"}


def _row(passed: bool = True, **overrides) -> dict:
    row = {
        "device": "cpu:0",
        "function": "softmax",
        "dtype": "float32",
        "derivation": "jacrev",
        "max_abs_error": 1e-7,
        "max_rel_error": 2e-7,
        "passed": passed,
    }
    row.update(overrides)
    return row


def _one_device_env() -> dict:
    env = dict(os.environ)
    # One host device: the suite runs once per device that JAX reports.
    flags = [
        f
        for f in env.pop("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.pop("JAX_ENABLE_X64", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_verify_subprocess_writes_passing_json_rows(tmp_path):
    out = tmp_path / "verify.json"
    env = _one_device_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jsoftmax",
            "verify",
            "--function",
            "logsumexp",
            "--dtype",
            "float32",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    assert {r["function"] for r in rows} == {"logsumexp"}
    assert {r["dtype"] for r in rows} == {"float32"}
    assert {r["derivation"] for r in rows} == {"analytic", "jacrev", "jacfwd"}
    assert all(r["passed"] and r["max_abs_error"] < 1e-5 for r in rows)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["device", "function", "dtype", "derivation"]
    assert lines[-1].startswith(f"verify: all {len(rows)} rows passed")


def test_summary_exit_status_is_nonzero_on_any_failure():
    line, status = _cli.summarize([_row(), _row(derivation="jacfwd")], 1.0)
    assert status == 0 and "all 2 rows passed" in line
    line, status = _cli.summarize([_row(), _row(passed=False, derivation="jacfwd")], 1.0)
    assert status == 1 and "FAILED: 1 of 2 rows" in line
    _, status = _cli.summarize([], 1.0)
    assert status == 1


def test_table_columns_are_aligned():
    table = _cli.format_table(
        [_row(), _row(passed=False, function="fused_cross_entropy", derivation="finite-difference")]
    )
    lines = table.splitlines()
    assert len(lines) == 4
    starts = [line.index("float32") for line in lines[2:]]
    assert starts[0] == starts[1] == lines[0].index("dtype")
    assert lines[2].endswith("PASS") and lines[3].endswith("FAIL")


def test_main_returns_one_when_a_row_fails(monkeypatch, tmp_path, capsys):
    def fake_suite(devices, dtypes, functions, progress=None):
        return [_row(), _row(passed=False, max_abs_error=math.inf)], ["cpu:0 softmax: broken"]

    monkeypatch.setattr(suite, "run_suite", fake_suite)
    out = tmp_path / "rows.json"
    status = _cli.main(["verify", "--function", "softmax", "--json", str(out)])
    assert status == 1
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "broken" in printed
    data = json.loads(out.read_text())  # strict JSON: inf is written as null
    assert data["rows"][1]["max_abs_error"] is None and data["rows"][1]["passed"] is False


def test_script_name_means_verify(monkeypatch):
    seen = {}

    def fake_suite(devices, dtypes, functions, progress=None):
        seen.update(functions=functions, dtypes=dtypes)
        return [_row()], []

    monkeypatch.setattr(suite, "run_suite", fake_suite)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/jsoftmax-verify"])
    assert _cli.main(["--function", "softmax", "--dtype", "float32"]) == 0
    assert seen == {"functions": ["softmax"], "dtypes": ["float32"]}


@pytest.mark.parametrize(
    "argv",
    [["verify", "--function", "no_such_function"], ["verify", "--dtype", "float8"], ["frobnicate"]],
)
def test_bad_arguments_are_usage_errors(argv):
    with pytest.raises(SystemExit) as info:
        _cli.main(argv)
    assert info.value.code == 2


def test_suite_flags_a_wrong_rule():
    """The suite is not a rubber stamp: a softmax whose VJP is doubled fails every row."""
    case = suite.build_cases("softmax", "float32", jax.devices()[0])[0]

    @jax.custom_vjp
    def wrong(x):
        return jsm.softmax(x)

    def fwd(x):
        return wrong(x), x

    def bwd(x, g):
        _, vjp = jax.vjp(jsm.softmax, x)
        return (2.0 * vjp(g)[0],)

    wrong.defvjp(fwd, bwd)
    case.fn = wrong
    case.forward_mode = False
    outcomes = {d: suite.Outcome() for d in suite.DERIVATIONS}
    suite.run_case(case, "float32", outcomes)
    for derivation in ("analytic", "jacrev", "jacfwd"):
        assert outcomes[derivation].failures, derivation
    assert "argument 0 ('x')" in outcomes["jacrev"].failures[0]


def test_verify_portable_checks_the_portable_formulation(tmp_path):
    out = tmp_path / "verify.json"
    command = [sys.executable, "-m", "jsoftmax", "verify", "--portable", "--dtype", "float32"]
    command += ["--function", "fused_cross_entropy", "--json", str(out)]
    proc = subprocess.run(
        command, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["function"] for r in rows} == {"fused_cross_entropy"}
    assert all(r["passed"] and r["formulation"] == "portable" for r in rows)
    assert {"analytic", "jacrev", "hessian"} <= {r["derivation"] for r in rows}
    assert proc.stdout.strip().splitlines()[-1].endswith("[portable formulation]")
