"""Every malformed call is refused at trace time, naming the argument first; every edge value is
answered as the contract says. The cases are the rows of ``tests/bad_inputs_table.py``, which
also generate the table of the docs page "What bad input gets"."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jsoftmax as jsm
from tests import bad_inputs_table as table
from tests import oracle
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]


def _is_array(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic)) and v.dtype.kind in "biufc"


def _split(args: tuple, kwargs: dict):
    """The array inputs (traced under jit) and a function of them that makes the call."""
    arg_slots = [i for i, a in enumerate(args) if _is_array(a)]
    kw_slots = [k for k, v in kwargs.items() if _is_array(v)]
    arrays = [args[i] for i in arg_slots] + [kwargs[k] for k in kw_slots]

    def bind(fn):
        def call(*traced):
            a, kw = list(args), dict(kwargs)
            for i, v in zip(arg_slots, traced[: len(arg_slots)], strict=True):
                a[i] = v
            for k, v in zip(kw_slots, traced[len(arg_slots) :], strict=True):
                kw[k] = v
            return fn(*a, **kw)

        return call

    return arrays, bind


# ------------------------------------------------------------------------------ malformed calls

BAD_CALL_PARAMS = [
    pytest.param(case, mode, id=f"{mode}-{case.id}")
    for case in table.BAD_CALLS
    for mode in ("eager", "jit")
    if mode == "jit" or not case.jit_only
]


@pytest.mark.parametrize("case,mode", BAD_CALL_PARAMS)
def test_bad_call_raises_at_trace_time_naming_the_argument_first(case, mode):
    fn = getattr(jsm, case.function)
    arrays, bind = _split(case.args, case.kwargs)
    call = bind(fn)
    with pytest.raises(case.error) as info:
        if mode == "eager":
            call(*arrays)
        else:
            jax.jit(call).trace(*arrays)  # raised while tracing: nothing is compiled or run
    message = str(info.value)
    assert type(info.value) is case.error, message
    assert message.startswith(case.message), message
    assert message.startswith(case.argument + ": ")


@pytest.mark.parametrize("case", [c for c in table.BAD_CALLS if c.jit_only], ids=lambda c: c.id)
def test_static_option_given_as_a_concrete_array_is_accepted_eagerly(case):
    # The same option that is refused when traced is a plain number when concrete.
    out = getattr(jsm, case.function)(*case.args, **case.kwargs)
    assert np.all(np.isfinite(np.asarray(out)))


def test_every_public_function_has_bad_call_rows():
    covered = {c.function for c in table.BAD_CALLS}
    public = set(table.NORMALIZERS + table.LOSSES + table.OPTAX_LOSSES)
    public |= {table.CHECK_LABELS, table.LINEAR}
    assert covered == public
    assert public == set(jsm.__all__) - {"testing"}
    kinds_per_loss = {f: {c.kind for c in table.BAD_CALLS if c.function == f} for f in table.LOSSES}
    assert kinds_per_loss["cross_entropy"] == kinds_per_loss["fused_cross_entropy"]


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_axis_name_bound_to_another_map_is_refused(fn):
    def per_example(z, y):
        return getattr(jsm, fn)(z, y, axis_name="vocab")

    with pytest.raises(ValueError, match="^axis_name: 'vocab' is not bound"):
        jax.vmap(per_example, axis_name="batch")(table.X, table.Y_INT)


# ----------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("case", table.CLI_CALLS, ids=lambda c: c.id)
def test_bad_command_line_exits_2_naming_the_flag(case, capsys):
    from jsoftmax import _cli

    with pytest.raises(SystemExit) as info:
        _cli.main(list(case.argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line.split(": error: ", 1)[1] for line in err.splitlines() if ": error: " in line]
    assert errors and errors[-1].startswith(case.message), err


def test_bad_command_line_through_python_m_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "verify", "--dtype", "float99"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --dtype: expected a comma-separated list" in proc.stderr


# ----------------------------------------------------------------------------------- edge values


def _expect(values: np.ndarray, what: str, context: str) -> None:
    v = np.asarray(values)
    if not np.iscomplexobj(v):
        v = v.astype(np.float64)
    checks = {
        "empty": lambda: v.size == 0,
        "nan": lambda: np.isnan(v).any(),
        "+inf": lambda: np.all(v == np.inf),
        "-inf": lambda: np.all(v == -np.inf),
        "0": lambda: np.all(v == 0),
        "finite": lambda: np.all(np.isfinite(v)),
    }
    assert checks[what](), f"{context}: expected {what}, got {v}"


def _vjp_of_first(call, arrays):
    first, rest = arrays[0], arrays[1:]
    out, pullback = jax.vjp(lambda a: call(a, *rest), jnp.asarray(first))
    cot = jnp.ones_like(out)
    return out, pullback(cot)[0]


_JITTED_VJPS: dict = {}


def _jit_vjp_of_first(case, bind):
    """``_vjp_of_first`` of the jitted call, with its VJP and the cotangent in one jitted program
    (a jitted call differentiated from outside compiles a forward and a backward program).

    Cases that differ only in array values (a NaN, an infinity or a bad label in the same
    inputs) make the same program: they share one jitted function, which compiles once per
    shape and dtype.
    """

    def static(v):
        return None if _is_array(v) else (type(v).__name__, v)

    key = (
        case.function,
        tuple(map(static, case.args)),
        tuple((k, static(v)) for k, v in case.kwargs.items()),
    )
    if key not in _JITTED_VJPS:
        call = jax.jit(bind(getattr(jsm, case.function)))
        _JITTED_VJPS[key] = jax.jit(lambda *arrays: _vjp_of_first(call, arrays))
    return _JITTED_VJPS[key]


EDGE_PARAMS = [
    pytest.param(case, mode, id=f"{mode}-{case.id}")
    for case in table.EDGE_VALUES
    for mode in ("eager", "jit")
]


@pytest.mark.parametrize("case,mode", EDGE_PARAMS)
def test_edge_value_is_answered_per_contract(case, mode):
    fn = getattr(jsm, case.function)
    arrays, bind = _split(case.args, case.kwargs)
    call = bind(fn)
    if mode == "jit":
        run = _jit_vjp_of_first(case, bind)
    else:
        run = lambda *arrays: _vjp_of_first(call, arrays)  # noqa: E731
    out, grad = run(*arrays)
    out, grad = np.asarray(out), np.asarray(grad)
    if case.row is None:
        _expect(out, case.value, "value")
        if case.grad is not None:
            _expect(grad, case.grad, "gradient")
        return
    others = [i for i in range(out.shape[0]) if i != case.row]
    _expect(out[case.row], case.value, f"value of example {case.row}")
    if case.grad is not None:
        _expect(grad[case.row], case.grad, f"gradient of example {case.row}")
    _expect(grad[others], "finite", "gradient of the other examples")
    _expect(out[others], "finite", "value of the other examples")
    if case.clean is not None:
        clean_arrays, _ = _split(case.clean, case.kwargs)
        clean_out, clean_grad = run(*clean_arrays)
        np.testing.assert_array_equal(out[others], np.asarray(clean_out)[others])
        np.testing.assert_array_equal(grad[others], np.asarray(clean_grad)[others])


def test_every_unchanged_claim_is_compared_with_a_clean_call():
    for case in table.EDGE_VALUES:
        if "unchanged" in case.result or "only" in case.result:
            assert case.clean is not None, case.id


@pytest.mark.parametrize(
    "case",
    [c for c in table.EDGE_VALUES if c.kind == "label equal to ignore_index"],
    ids=lambda c: c.id,
)
def test_ignored_examples_are_left_out_of_the_mean(case):
    # The docs' row "label equal to ignore_index" also claims this.
    fn = getattr(jsm, case.function)
    kwargs = {**case.kwargs, "reduction": "none"}
    rows = np.asarray(fn(*case.args, **kwargs))
    mean = fn(*case.args, **{**kwargs, "reduction": "mean"})
    kept = np.delete(rows, case.row)
    np.testing.assert_allclose(mean, kept.mean(), rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_check_labels_turns_a_bad_label_into_an_error(mode):
    labels, num_classes = table.CHECK_LABELS_CASE
    expected = "labels: 1 label(s) outside [0, 3); first bad label 5 at flat index 1"
    assert expected in table.CHECK_LABELS_RESULT[1]
    if mode == "eager":
        with pytest.raises(Exception, match=r"^labels: 1 label\(s\) outside \[0, 3\)") as info:
            jsm.check_labels(labels, num_classes)
        assert str(info.value).startswith(expected)
    else:
        checked = checkify.checkify(jax.jit(lambda y: jsm.check_labels(y, num_classes)))
        err, _ = checked(labels)
        assert err.get() is not None and err.get().startswith(expected)


# ------------------------------------------------------------------------------- regressions
# Each bug below was found by this table or by tests/test_campaign.py.


@functools.cache
def _smoothed_value_and_grad(fn: str):
    """Jitted value and gradient of the summed loss with label smoothing, one per function, so
    that the int32 program is compiled once for both narrow dtypes."""
    f = getattr(jsm, fn)

    @jax.jit
    def value_and_grad(z, y):
        return jax.value_and_grad(lambda v: f(v, y, label_smoothing=0.1, reduction="sum"))(z)

    return value_and_grad


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_narrow_integer_labels_do_not_wrap_against_the_class_count(fn, dtype):
    # int8 labels compared with C = 130 used to convert 130 to int8 (-126) first: label 100 was
    # "bad" (NaN), and the one-hot of label 5 also hit class 5 + 256 in the reference.
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 130)).astype(np.float32))
    labels = np.array([5, 100, 120], dtype)
    value_and_grad = _smoothed_value_and_grad(fn)
    wide = value_and_grad(logits, jnp.asarray(labels, jnp.int32))
    narrow = value_and_grad(logits, jnp.asarray(labels))
    assert np.isfinite(narrow[0])
    np.testing.assert_array_equal(narrow[0], wide[0])
    np.testing.assert_array_equal(narrow[1], wide[1])


def test_check_labels_does_not_wrap_narrow_labels_or_a_huge_class_count():
    jsm.check_labels(jnp.asarray(np.int8([5, 100, 127])), 130)  # all in range: no error
    jsm.check_labels(jnp.asarray([0, 7]), 2**40)  # num_classes beyond int32: no overflow
    with pytest.raises(Exception, match="first bad label -1"):
        jsm.check_labels(jnp.asarray(np.int8([5, -1])), 130)


def test_check_labels_accepts_empty_labels():
    # used to fail in argmax of an empty array
    out = jsm.check_labels(jnp.zeros((0,), jnp.int32), 3)
    assert out.shape == (0,)
    err, _ = checkify.checkify(jax.jit(lambda y: jsm.check_labels(y, 3)))(jnp.zeros((2, 0), int))
    assert err.get() is None


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_uint8_labels_with_ignore_index_minus_100_are_refused_not_wrapped(fn):
    # -100 used to wrap to 156 in the comparison, silently ignoring label 156 (a bad label).
    with pytest.raises(ValueError, match="^ignore_index: -100 cannot be represented"):
        getattr(jsm, fn)(jnp.zeros((2, 3)), jnp.asarray(np.uint8([156, 1])), ignore_index=-100)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_python_int_label_is_accepted(fn):
    # labels is ArrayLike: a Python int is a 0-d class id, as jnp.asarray(2) is. It used to be
    # refused with "labels: expected an array, got int".
    logits = jnp.array([[4.0, -4.0, 3.0]])
    f = getattr(jsm, fn)
    got = jax.jit(lambda z: f(z[0], 2))(logits)
    want = jax.jit(lambda z, y: f(z[0], y))(logits, jnp.asarray(2))
    assert got == want and np.isfinite(got)


@pytest.mark.parametrize("option", ["label_smoothing", "z_loss"])
def test_numeric_string_option_is_refused(option):
    # float("0.1") used to turn a string into a valid option.
    with pytest.raises(TypeError, match=f"^{option}: expected a float, got str"):
        jsm.cross_entropy(table.X, table.Y_INT, **{option: "0.1"})


@pytest.mark.parametrize("fn", ["softmax_jacobian", "cross_entropy", "fused_cross_entropy"])
def test_class_axis_of_size_zero_is_refused_naming_the_array(fn):
    # used to fail inside jnp.max with "zero-size array to reduction operation max" (softmax and
    # logsumexp now answer it as jax.nn does: tests/test_jax_nn_compat.py)
    f = getattr(jsm, fn)
    args = (jnp.zeros((2, 0)),) + ((jnp.zeros(2, jnp.int32),) if "entropy" in fn else ())
    name = "logits" if "entropy" in fn else "x"
    with pytest.raises(ValueError, match=f"^{name}: the class axis .* has size 0"):
        f(*args)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_nan_logit_gives_nan_loss_not_zero(fn, kind):
    # A row with a NaN (or +inf) logit used to count as "nothing included" and give loss 0 with
    # a NaN gradient, hiding a diverged model.
    logits = jnp.array([[1.0, jnp.nan, 0.0], [1.0, jnp.inf, 0.0], [1.0, 2.0, 0.0]])
    labels = jnp.array([0, 0, 1]) if kind == "int" else jax.nn.one_hot(jnp.array([0, 0, 1]), 3)
    out = np.asarray(getattr(jsm, fn)(logits, labels))
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isfinite(out[2])


@pytest.mark.parametrize("fn", ["log_softmax", "logsumexp"])
def test_nan_logit_gives_nan_log_probabilities_not_minus_inf(fn):
    out = np.asarray(getattr(jsm, fn)(jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 0.0]]), -1))
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_label_gradient_of_a_row_with_nothing_included_is_zero(fn):
    # Found by the campaign: the reference gave a NaN label gradient (0 * inf) for a row of
    # -inf logits with a positive soft label; the loss of that row is 0, so is its gradient.
    logits = jnp.array([[-jnp.inf, -jnp.inf], [1.0, 0.0]])
    labels = jnp.array([[1.0, 0.5], [0.3, 0.7]])
    f = getattr(jsm, fn)
    g_z, g_y = jax.jit(jax.grad(lambda z, y: f(z, y).sum(), argnums=(0, 1)))(logits, labels)
    assert np.all(np.asarray(g_z[0]) == 0) and np.all(np.asarray(g_y[0]) == 0)
    assert np.all(np.isfinite(g_z)) and np.all(np.isfinite(g_y))


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_zero_target_on_a_minus_inf_logit_has_zero_label_gradient(fn):
    # Found by the campaign: the fused label gradient was -log a = +inf there, the reference's
    # 0. With 0 · log 0 = 0 the class contributes nothing, so its label gradient is 0 (a +inf
    # would turn a teacher's softmax gradient into inf * 0 = NaN).
    logits = jnp.array([-jnp.inf, 0.0, 0.0])
    g = jax.jit(jax.grad(lambda y: getattr(jsm, fn)(logits, y, label_smoothing=0.2), argnums=0))(
        jnp.array([0.0, 0.4, 0.6])
    )
    np.testing.assert_allclose(g, [0.0, 0.8 * np.log(2), 0.8 * np.log(2)], rtol=1e-6)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_excluded_class_has_zero_gradient_in_a_nan_row_with_soft_labels(fn):
    # Found by the campaign: with soft labels the fused gradient was NaN on excluded classes
    # of a NaN row (integer labels and the reference gave 0): excluded classes do not exist.
    logits = jnp.array([[1.0, jnp.nan, 5.0], [1.0, 2.0, 5.0]])
    where = jnp.array([True, True, False])
    labels = jnp.array([[0.2, 0.8, 0.5], [0.2, 0.8, 0.5]])
    g = np.asarray(
        jax.jit(jax.grad(lambda z: getattr(jsm, fn)(z, labels, where=where).sum()))(logits)
    )
    assert np.all(np.isnan(g[0, :2])) and g[0, 2] == 0 and g[1, 2] == 0


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_z_loss_of_huge_logits_neither_overflows_early_nor_gives_nan(fn):
    # Found by the campaign: c·lse² overflowed in lse² (1e20² = inf in float32) although the
    # product 1e-4·1e40 = 1e36 fits, and a z_loss below float32's range became 0 · inf = NaN.
    logits = jnp.array([[1e20, 0.0, 0.0], [1e30, 0.0, 0.0]])
    f = getattr(jsm, fn)
    loss = np.asarray(f(logits, jnp.array([0, 0]), z_loss=1e-4))
    np.testing.assert_allclose(loss[0], 1e36, rtol=1e-6)
    assert loss[1] == np.inf  # 1e-4 · 1e60 is beyond float32: +inf, the rounded answer
    assert np.all(np.asarray(f(logits, jnp.array([0, 0]), z_loss=1e-214)) == 0)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_cross_entropy"])
def test_ignored_example_with_an_empty_row_is_left_out_of_the_mean(fn):
    # Found by the deep campaign (the float64 oracle counted it): an ignored example is left
    # out of the mean even when its row has nothing included.
    logits = jnp.array([[-jnp.inf], [1.0], [-jnp.inf]])
    labels = jnp.array([-100, 0, 0])
    mean = getattr(jsm, fn)(logits, labels, ignore_index=-100, z_loss=1e-4, reduction="mean")
    np.testing.assert_allclose(mean, 1e-4 / 2, rtol=1e-6)  # rows 1 and 2 count; row 2 is 0
    np.testing.assert_allclose(
        oracle.cross_entropy(
            np.asarray(logits), np.asarray(labels), ignore_index=-100, z_loss=1e-4, reduction="mean"
        )[0],
        1e-4 / 2,
        rtol=1e-12,
    )


# ------------------------------------------------------------------------------------ docs


def test_docs_bad_input_table_is_generated_from_this_table():
    script = load_script("bad_input_table")
    page = (REPO / "docs" / "bad-input.md").read_text()
    assert script.START in page and script.END in page, (
        f"docs/bad-input.md lacks the markers {script.START} / {script.END}"
    )
    assert script.main(["--check", str(REPO / "docs" / "bad-input.md")]) == 0


def test_table_script_renders_every_row_and_saves_json_and_png(tmp_path, capsys):
    script = load_script("bad_input_table")
    assert script.main(["--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(script.NOTE)
    data = json.loads((tmp_path / "bad_input_table.json").read_text())
    assert data["total_cases"] == (
        len(table.BAD_CALLS) + len(table.EDGE_VALUES) + len(table.CLI_CALLS) + 1
    )
    for row in data["rows"]:
        assert f"| {row['input']} |" in printed
    assert (tmp_path / "bad_input_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
