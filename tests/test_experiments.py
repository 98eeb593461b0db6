"""The experiment scripts run end to end in quick mode, and the claim each one makes holds."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tests.scripts import load_script

EPS32 = float(np.finfo(np.float32).eps)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_main(module: ModuleType, argv: list[str]) -> tuple[dict, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        result = module.main(argv)
    return result, stdout.getvalue()


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600 and height >= 300, (path, width, height)


def leftover_temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- train_digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    module = load_script("train_digits")
    out = tmp_path_factory.mktemp("train_digits")
    params = out / "params.npz"
    result, stdout = run_main(
        module, ["--quick", "--out", str(out), "--save", str(params), "--label-smoothing", "0.1"]
    )
    return module, out, params, result, stdout


def test_train_digits_quick_reaches_sane_accuracy(digits):
    _, _, _, result, _ = digits
    assert result["test_accuracy"] >= 0.85
    assert result["optax_test_accuracy"] >= 0.85


def test_train_digits_prints_test_accuracy_last(digits):
    _, _, _, result, stdout = digits
    last = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test accuracy: 0\.\d{3}", last), last
    assert float(last.split(": ")[1]) == pytest.approx(result["test_accuracy"], abs=5e-4)


def test_train_digits_losses_agree_to_round_off(digits):
    _, _, _, result, _ = digits
    # Same parameters and batch: the two formulations differ by a few float32 roundings.
    assert result["same_input_max_abs_loss_difference"] <= 8 * EPS32 * 3.0  # loss ≤ ~3 nats
    assert result["same_input_max_rel_grad_difference"] <= 1e-4
    # Two independent runs of a short training: still round-off, not a different function.
    assert result["trajectory_first_step_abs_loss_difference"] <= 8 * EPS32 * 3.0
    assert result["trajectory_max_abs_loss_difference"] <= 1e-4
    losses = np.asarray(result["step_loss"]["jsoftmax"])
    assert losses[-1] < losses[0]


def test_train_digits_writes_json_and_pngs(digits):
    _, out, _, result, _ = digits
    saved = json.loads((out / "train_digits.json").read_text())
    assert saved["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert saved["config"]["label_smoothing"] == 0.1
    assert set(saved["median_step_time_us"]) == {"jsoftmax", "optax"}
    assert all(t > 0 for t in saved["median_step_time_us"].values())
    for png in result["png"]:
        assert_png(png)
    assert leftover_temp_files(out) == []


def test_train_digits_save_load_round_trips(digits, tmp_path):
    module, _, params, result, _ = digits
    loaded = module.load_params(params)
    assert sorted(loaded) == ["b0", "b1", "w0", "w1"]
    assert loaded["w0"].shape == (64, 64) and loaded["w1"].shape == (64, 10)
    again, stdout = run_main(
        module, ["--load", str(params), "--epochs", "0", "--out", str(tmp_path)]
    )
    assert again["test_accuracy"] == result["test_accuracy"]
    assert stdout.strip().splitlines()[-1] == f"test accuracy: {result['test_accuracy']:.3f}"
    # Saving the loaded parameters again gives the same arrays.
    copy = module.save_params(tmp_path / "copy.npz", loaded)
    for key, value in module.load_params(copy).items():
        np.testing.assert_array_equal(value, loaded[key])
    assert leftover_temp_files(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_old_file_and_no_temp(digits, tmp_path, monkeypatch, failure):
    module, _, params, _, _ = digits
    target = tmp_path / "params.npz"
    target.write_bytes(params.read_bytes())
    before = target.read_bytes()

    def savez_then_fail(file, **arrays):
        file.write(b"partial")
        raise failure

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(type(failure)):
        module.save_params(target, module.load_params(params))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.npz"]


def test_load_refuses_pickled_arrays(digits, tmp_path):
    module = digits[0]
    path = tmp_path / "pickled.npz"
    np.savez(path, w0=np.array([{"a": 1}], dtype=object), b0=np.zeros(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        module.load_params(path)


@pytest.mark.parametrize(
    "arrays",
    [
        {"w0": np.zeros((64, 10), np.float32)},
        {"w0": np.zeros((63, 10), np.float32), "b0": np.zeros(10, np.float32)},
        {"w0": np.zeros((64, 9), np.float32), "b0": np.zeros(9, np.float32)},
        {"w0": np.zeros((64, 10), np.int32), "b0": np.zeros(10, np.int32)},
    ],
    ids=["missing-bias", "wrong-input-width", "wrong-class-count", "integer-weights"],
)
def test_load_rejects_malformed_params(digits, tmp_path, arrays):
    module = digits[0]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="^--load: "):
        module.load_params(path)


# --- softmax_regression ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    module = load_script("softmax_regression")
    out = tmp_path_factory.mktemp("softmax_regression")
    result, stdout = run_main(module, ["--quick", "--out", str(out)])
    return module, out, result, stdout


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_three_softmax_losses_agree(regression, reg):
    module = regression[0]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6))
    y = rng.integers(0, 4, size=20)
    W = rng.normal(size=(6, 4))
    loss_loops, dw_loops = module.softmax_loss_loops(W, X, y, reg)
    loss_vec, dw_vec = module.softmax_loss_vectorized(W, X, y, reg)
    loss_jsm, dw_jsm = module.softmax_loss_jsoftmax(
        W.astype(np.float32), X.astype(np.float32), y, reg
    )
    numerical = module.numerical_gradient(
        lambda w: module.softmax_loss_vectorized(w, X, y, reg)[0], W
    )
    assert loss_loops == pytest.approx(loss_vec, rel=1e-13)
    np.testing.assert_allclose(dw_loops, dw_vec, rtol=1e-12, atol=1e-14)
    assert module.rel_error(dw_vec, numerical) < 1e-8
    assert float(loss_jsm) == pytest.approx(loss_vec, rel=1e-6)
    assert module.rel_error(np.asarray(dw_jsm), numerical) < 1e-5


def test_softmax_regression_gradient_check_passes(regression):
    agreement = regression[2]["agreement"]
    for name in ("numpy loops", "numpy vectorized", "jsoftmax float64"):
        assert agreement[name]["dW_rel_error_vs_numerical"] < 1e-7, name
        assert agreement[name]["loss_abs_diff_vs_vectorized"] < 1e-12, name
    assert agreement["jsoftmax float32"]["dW_rel_error_vs_numerical"] < 1e-5
    assert agreement["jsoftmax float32"]["loss_abs_diff_vs_vectorized"] < 1e-5


def test_softmax_regression_trains_identically(regression):
    _, out, result, _ = regression
    numpy_run, jsm_run = (
        result["training"]["numpy vectorized"],
        result["training"]["jsoftmax float32"],
    )
    assert jsm_run["test_accuracy"] >= 0.9
    assert jsm_run["test_accuracy"] == pytest.approx(numpy_run["test_accuracy"], abs=0.005)
    assert result["training_max_abs_loss_difference"] < 1e-5
    assert all(t > 0 for t in result["median_seconds"].values())
    assert_png(result["png"])
    saved = json.loads((out / "softmax_regression.json").read_text())["training"]
    for name, row in result["training"].items():
        assert saved[name]["test_accuracy"] == pytest.approx(row["test_accuracy"]), name


# --- stability ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stability(tmp_path_factory):
    module = load_script("stability")
    out = tmp_path_factory.mktemp("stability")
    result, stdout = run_main(module, ["--quick", "--out", str(out)])
    return module, out, result, stdout


def test_naive_softmax_overflows_and_ours_does_not(stability):
    overflow = stability[2]["overflow"]
    assert np.all(np.isnan(np.asarray(overflow["naive_float32"])))
    np.testing.assert_array_equal(np.asarray(overflow["jsoftmax_float32"]), [0.0, 0.0, 1.0])
    expected = [5.7527441e-290, 2.3984879e-145, 1.0]
    np.testing.assert_allclose(overflow["mpmath"], expected, rtol=1e-7)
    np.testing.assert_allclose(overflow["float64_shifted"], overflow["mpmath"], rtol=1e-12)


def test_cross_entropy_from_logits_stays_exact_as_scale_grows(stability):
    scale = stability[2]["scale"]
    for name in ("naive softmax, then log", "jax.nn.softmax, then log"):
        assert not np.isfinite(scale["values"][name][-1]), name
        assert scale["first_non_finite_scale"][name]["scale"] <= 1e2, name
    for name in ("jsm.cross_entropy", "jsm.fused_cross_entropy"):
        assert max(scale["rel_errors"][name]) <= 4 * EPS32, name


def test_confident_loss_keeps_its_digits(stability):
    rows = stability[2]["confident"]["rows"]
    assert [row["optax"] for row in rows] == [0.0] * len(rows)
    for row in rows:
        assert 1e-31 < row["true"] <= 1.01e-9
        assert row["jsm.cross_entropy rel_error"] <= 4 * EPS32
        assert row["jsm.fused_cross_entropy rel_error"] <= 4 * EPS32


def test_push_all_pull_one_values(stability):
    pp = stability[2]["push_pull"]
    assert pp["loss"] == pytest.approx(1.3135068, rel=1e-6)
    expected_grad = [0.73087937, 2.4518272e-04, -0.73112452]
    np.testing.assert_allclose(np.asarray(pp["grad_fused"]), expected_grad, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pp["grad_autodiff"]), expected_grad, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(pp["grad_fused"]), np.asarray(pp["softmax_minus_onehot"]), rtol=0, atol=EPS32
    )


def test_two_class_cross_entropy_equals_sigmoid_bce(stability):
    worst = stability[2]["binary"]["worst"]
    assert worst["ce_value_rel_error"] <= 4 * EPS32
    assert worst["ce_grad_rel_error"] <= 4 * EPS32
    assert worst["value_abs_diff"] <= 4 * EPS32
    assert worst["grad_abs_diff"] <= 8 * EPS32


def test_low_temperature_gives_one_hot(stability):
    temperature = stability[2]["temperature"]
    assert temperature["temperatures"][0] == pytest.approx(1e-3)
    np.testing.assert_array_equal(temperature["jsoftmax"][0], [1.0, 0.0, 0.0, 0.0])
    assert np.isnan(temperature["naive"][0]).any()
    l1 = np.asarray(temperature["l1_to_onehot"])
    assert np.all(np.diff(l1) >= -EPS32)  # monotone: farther from one-hot as T grows


def test_stability_summary_all_ok_and_files_written(stability):
    _, out, result, stdout = stability
    assert [row["ok"] for row in result["summary"]] == ["True"] * len(result["summary"])
    assert "push-pull" in stdout
    saved = json.loads((out / "stability.json").read_text())
    assert saved["overflow"]["naive_float32"] == ["NaN", "NaN", "NaN"]
    assert_png(result["png"])
