"""What XLA's TPU and GPU compilers make of jsoftmax, compiled here without the devices.

Runs ``experiments/bench_accelerators.py`` on the headline shape, [8192, 32768] in float32 and
bfloat16, for the programs that carry the claims: every program meets the targets (bytes at
most 1.05x the peer's, temporaries at most the peer's + 1 MiB, no float32 copy of bfloat16
logits) or stays within the bounds that the docs give for it, with the reason
(``EXCEPTIONS`` in the script). Needs the ``tpu-aot`` / ``gpu-aot`` extras; skipped otherwise.
"""

from __future__ import annotations

import pytest

from tests.scripts import load_script

SHAPES = [(8192, 32768)]
PROGRAMS = [
    "value_and_grad fused_cross_entropy int plain",
    "value_and_grad fused_cross_entropy int smoothing",
    "value_and_grad fused_cross_entropy soft plain",
    "value_and_grad cross_entropy int plain",
    "softmax",
    "log_softmax",
    "logsumexp",
]


@pytest.fixture(scope="module", params=["tpu", "gpu"])
def compiled(request):
    bench = load_script("bench_accelerators")
    reason = bench.extras_missing(request.param)
    if reason is not None:
        pytest.skip(f"no deviceless {request.param.upper()} compiler here: {reason}")
    rows = bench.run_compiler(
        request.param, SHAPES, ["float32", "bfloat16"], selected=PROGRAMS, log=lambda *a: None
    )
    return bench, request.param, rows


def test_every_program_meets_the_targets_or_its_documented_bound(compiled):
    bench, kind, rows = compiled
    assert {r["program"] for r in rows} == set(PROGRAMS)
    outside = [
        (r["program"], r["dtype"], round(r["bytes_ratio"], 3), r["ours"]["temp_bytes"])
        for r in rows
        if not bench.within_bounds(r)
    ]
    assert not outside, f"{kind}: {outside}"


def test_fused_loss_and_normalizers_meet_the_targets_on_tpu(compiled):
    bench, kind, rows = compiled
    if kind != "tpu":
        pytest.skip("the TPU compiler's byte count is exact; the GPU figure is a bound")
    missed = [
        (r["program"], r["dtype"], round(r["bytes_ratio"], 3))
        for r in rows
        if not r["program"].startswith("value_and_grad cross_entropy")  # the reference
        and not r["meets_targets"]
    ]
    assert not missed


def test_bfloat16_logits_get_no_float32_copy(compiled):
    _, kind, rows = compiled
    copies = [
        r["program"] for r in rows if r["dtype"] == "bfloat16" and r["ours"]["float32_copies"]
    ]
    assert not copies, f"{kind}: {copies}"


def test_linear_head_needs_no_more_temporary_memory_than_the_naive_head(compiled):
    bench, kind, _ = compiled
    for row in bench.run_linear(kind, bench.QUICK_LINEAR_SHAPES, ["float32"], log=lambda *a: None):
        assert row["ours_temp_mib"] <= row["naive_temp_mib"], row
