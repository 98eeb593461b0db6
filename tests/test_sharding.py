"""Sharded and vocab-parallel losses on 8 simulated CPU devices (see conftest.py).

Two ways to split the class axis, both checked against the single-device call:

* ``axis_name=`` inside ``jax.shard_map``: the local shard of the logits with global labels.
* plain ``jax.jit`` with ``NamedSharding`` inputs, on meshes of both axis types (``Auto``: XLA
  propagates the sharding; ``Explicit``: the sharding is in the types).

Every compiled program is also read back as HLO text, to check that what crosses devices is
per-row statistics only: no collective carries an array with more than one number per row.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _numerics, _sharding, _targets

B, C = 8, 24  # rows, classes: C splits over 1, 2, 4 and 8 devices and differs from every B
IGNORE = -100
MESHES = [(2, 4), (1, 8), (8, 1)]  # (devices along the batch, devices along the classes)


def case_id(value) -> str:
    """Test ids: ``2x4`` for a mesh shape, the value itself otherwise."""
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return str(value)


LOSSES = {"reference": jsm.cross_entropy, "fused": jsm.fused_cross_entropy}
CONFIGS = {  # no option, and every option at once
    "plain": {},
    "all": {"label_smoothing": 0.1, "z_loss": 0.01, "ignore_index": IGNORE, "where": True},
}
# Rows of the test batch whose integer label is bad in some configuration (see ``case``).
OUT_OF_RANGE, IGNORED, ON_EXCLUDED = 4, 5, 6
EXCLUDED = (2, 9, 13, 20)  # one excluded class on each of four class shards
RTOL, ATOL = 1e-5, 1e-6

# The meshes are made of the 8 simulated CPU devices that tests/conftest.py asks for, also on a
# machine with an accelerator (the flag affects the host platform only).
pytestmark = pytest.mark.skipif(
    len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (see tests/conftest.py)"
)


@functools.cache
def mesh(shape, axis_type=AxisType.Auto):
    devices = jax.devices("cpu")[: math.prod(shape)]
    return jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2, devices=devices)


@functools.cache
def case(kind: str):
    """Logits ``[B, C]``, labels, class mask and a per-row cotangent, as NumPy arrays.

    Row 0 has -inf logits off the label (``0 · log 0``); row 1's label is the last class (last
    shard); row 2's label points at a -inf logit (loss +inf); row 3 is all -inf (loss 0); row 4's
    label is out of range (NaN); row 5's label is ``IGNORE`` (ignored, or NaN without
    ``ignore_index``); row 6's label is an excluded class (NaN under ``where``); row 7 is
    confident (loss near 1e-16).
    """
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(B, C)) * 2).astype(np.float32)
    z[0, [5, 11, 17]] = -np.inf
    z[2, 10] = -np.inf
    z[3] = -np.inf
    z[7, 17] = 40.0
    mask = np.ones((B, C), bool)
    mask[:, list(EXCLUDED)] = False
    cot = np.arange(1, B + 1, dtype=np.float32)
    if kind == "int":
        y = np.array([0, C - 1, 10, 5, C + 3, IGNORE, 13, 17], np.int32)
    else:
        y = rng.random((B, C)).astype(np.float32)  # soft targets, rows do not sum to 1
        y[0, [5, 11, 17]] = 0.0  # zero weight on -inf logits: 0 · log 0 = 0
    return z, y, mask, cot


def options(config: str, kind: str, mask=None):
    """Keyword options of a config; ``where=mask`` if the config has a mask (else no ``where``)."""
    kw = dict(CONFIGS[config])
    if kw.pop("where", False) and mask is not None:
        kw["where"] = mask
    if kind == "float":
        kw.pop("ignore_index", None)  # integer labels only
    return kw


def bad_rows(kind: str, config: str) -> np.ndarray:
    """The rows whose loss and gradient must be NaN, and only those."""
    bad = np.zeros(B, bool)
    if kind == "int":
        bad[OUT_OF_RANGE] = True
        bad[IGNORED] = CONFIGS[config].get("ignore_index") != IGNORE
        bad[ON_EXCLUDED] = CONFIGS[config].get("where", False)
    return bad


# ------------------------------------------------------------------------------ HLO inspection

_COLLECTIVE = re.compile(
    r"=\s*(?P<result>\S.*?)\s+(?P<op>all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\b(?:pred|bf16|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def collective_arrays(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(op, shape)`` of every array that a collective of the compiled program produces."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if match:
            for dims in _ARRAY.findall(match["result"]):
                found.append((match["op"], tuple(int(d) for d in dims.split(",") if d)))
    return found


def assert_moves_row_statistics_only(compiled, rows: int, classes: int, expect_any: bool):
    """No collective carries more than one number per row, nor anything class-sized."""
    arrays = collective_arrays(compiled.as_text())
    for op, shape in arrays:
        assert math.prod(shape) <= rows and classes not in shape, (
            f"{op} of shape {shape} crosses devices (rows={rows}, classes={classes})"
        )
    if expect_any:  # a class axis split over >1 device must combine statistics somewhere
        assert any(op == "all-reduce" for op, _ in arrays), "no all-reduce found in the HLO"


def test_collective_arrays_reads_hlo_results():
    hlo = (
        "  %all-reduce.9 = (f32[4]{0}, f32[4,1]{1,0}) all-reduce(%a, %b), channel_id=5\n"
        "  %all-gather = f32[4,24]{0,1} all-gather(%c), dimensions={1}\n"
        "  ROOT %x = bf16[] all-reduce-start(%d)\n"
        "  %all-reduce.2 = f32[3]{0} add(%e, %f)\n"
    )
    assert collective_arrays(hlo) == [
        ("all-reduce", (4,)),
        ("all-reduce", (4, 1)),
        ("all-gather", (4, 24)),
        ("all-reduce", ()),
    ]


# ----------------------------------------------------------------- axis_name inside shard_map
# Compiling for 8 devices dominates the run time, so each test compiles one program that holds
# every (loss, label kind) sub-case, and the single-device results are compiled once per config.

KINDS = ("int", "float")
SUBCASES = [(loss, kind) for loss in LOSSES for kind in KINDS]


def argnums(kind: str) -> tuple[int, ...]:
    return (0,) if kind == "int" else (0, 1)  # float labels are differentiable too


def put(m, arrays, specs):
    return [
        None if a is None else jax.device_put(a, NamedSharding(m, s))
        for a, s in zip(arrays, specs, strict=True)
    ]


def single_device_step(fn, kind, kw):
    """Per-example loss and its VJP (logits, and float labels) for the cotangent ``cot``."""

    def step(z, y, cot):
        loss, pullback = jax.vjp(lambda z, y: fn(z, y, **kw), z, y)
        grads = pullback(cot)
        return loss, tuple(grads[i] for i in argnums(kind))

    return step


@functools.cache
def single_device_results(config: str):
    steps, args = [], []
    for loss, kind in SUBCASES:
        z, y, mask, cot = case(kind)
        steps.append(single_device_step(LOSSES[loss], kind, options(config, kind, mask)))
        args.append((z, y, cot))
    return jax.jit(lambda args: [s(*a) for s, a in zip(steps, args, strict=True)])(args)


def shard_map_step(fn, kind, kw, m):
    """The loss inside ``shard_map`` with the class axis over "model".

    Returns the per-example loss, the gradients taken *inside* the map (a training step written
    per device: each device differentiates its own shard) and the gradients of the mapped
    function taken from outside; and the input specs.
    """
    row, full = P("data"), P("data", "model")
    label_spec = row if kind == "int" else full
    kw = dict(kw)
    mask = kw.pop("where", None)
    grad_specs = tuple((full, label_spec)[i] for i in argnums(kind))

    def local_loss(z, y, w):
        return fn(z, y, where=w, axis_name="model", **kw)

    def local_step(z, y, w, cot):
        loss, pullback = jax.vjp(lambda z, y: local_loss(z, y, w), z, y)
        grads = pullback(cot)
        return loss, tuple(grads[i] for i in argnums(kind))

    specs = (full, label_spec, None if mask is None else full, row)
    mapped_loss = jax.shard_map(local_loss, mesh=m, in_specs=specs[:3], out_specs=row)
    mapped_step = jax.shard_map(local_step, mesh=m, in_specs=specs, out_specs=(row, grad_specs))

    def step(z, y, w, cot):
        loss, inner = mapped_step(z, y, w, cot)
        _, pullback = jax.vjp(lambda z, y: mapped_loss(z, y, w), z, y)
        outer = pullback(cot)
        return loss, inner, tuple(outer[i] for i in argnums(kind))

    return step, specs


SHARD_MAP_CASES = [("plain", (2, 4)), ("all", (2, 4)), ("all", (1, 8)), ("all", (8, 1))]


@pytest.mark.parametrize(("config", "mesh_shape"), SHARD_MAP_CASES, ids=case_id)
def test_axis_name_matches_unsharded_value_and_gradients(config, mesh_shape):
    """Local shard + global labels (or the local slice of float labels) = unsharded call.

    Covers both losses and both label kinds; "all" has the class mask split over the shards,
    label smoothing, z-loss and ignore_index at once. Bad labels are NaN in their row only.
    """
    m = mesh(mesh_shape)
    steps, args = [], []
    for loss, kind in SUBCASES:
        z, y, mask, cot = case(kind)
        kw = options(config, kind, mask)
        step, specs = shard_map_step(LOSSES[loss], kind, kw, m)
        steps.append(step)
        args.append(put(m, (z, y, kw.get("where"), cot), specs))
    compiled = (
        jax.jit(lambda args: [s(*a) for s, a in zip(steps, args, strict=True)])
        .lower(args)
        .compile()
    )
    results = compiled(args)

    for (loss, kind), got, want in zip(
        SUBCASES, results, single_device_results(config), strict=True
    ):
        what = f"{loss} loss, {kind} labels"
        (got_loss, inner, outer), (want_loss, want_grads) = got, want
        np.testing.assert_allclose(got_loss, want_loss, RTOL, ATOL, True, err_msg=what)
        for got_grads in (inner, outer):
            for g, w in zip(got_grads, want_grads, strict=True):
                np.testing.assert_allclose(g, w, RTOL, ATOL, True, err_msg=what)
        bad = bad_rows(kind, config)
        np.testing.assert_array_equal(np.isnan(got_loss), bad, err_msg=what)
        np.testing.assert_array_equal(np.isnan(inner[0]).any(-1), bad, err_msg=what)
        assert inner[0].sharding.spec == outer[0].sharding.spec == P("data", "model"), what
    assert_moves_row_statistics_only(compiled, B, C, expect_any=mesh_shape[1] > 1)


def value_and_grads(fn, kw, argnums, z, y, w, axis_name=None):
    return jax.value_and_grad(lambda z, y: fn(z, y, where=w, axis_name=axis_name, **kw), argnums)(
        z, y
    )


def test_axis_name_reductions_match_unsharded():
    """``"sum"`` and ``"mean"`` (which skips ignored rows) with every option, batch unsplit.

    (The reduction code does not depend on the label kind, except the mean's count of ignored
    rows: float labels are checked with the sum, integer labels with the mean.)

    On the 1×8 mesh every device holds all rows, so the reduction inside the map is global.
    The last sub-cases ignore every row: the mean is 0 with a zero gradient.
    """
    keep = np.array([0, 1, 5, 7])  # finite rows; row 5 is ignored
    m = mesh((1, 8))
    subcases = [("sum", loss, "float", False) for loss in LOSSES]
    subcases += [("mean", loss, "int", all_ignored) for loss in LOSSES for all_ignored in (0, 1)]
    local_fns, single_fns, args = [], [], []
    for reduction, loss, kind, all_ignored in subcases:
        fn = LOSSES[loss]
        z, y, mask, _ = case(kind)
        z, y = z[keep], (np.full(len(keep), IGNORE, np.int32) if all_ignored else y[keep])
        kw = dict(options("all", kind, mask[keep]), reduction=reduction)
        specs = (P(None, "model"), P() if kind == "int" else P(None, "model"), P(None, "model"))
        w = kw.pop("where")

        local = functools.partial(value_and_grads, fn, kw, argnums(kind), axis_name="model")
        out_specs = (P(), specs[: len(argnums(kind))])
        local_fns.append(jax.shard_map(local, mesh=m, in_specs=specs, out_specs=out_specs))
        single_fns.append(functools.partial(value_and_grads, fn, kw, argnums(kind)))
        args.append((put(m, (z, y, w), specs), (z, y, w)))

    got = jax.jit(lambda a: [f(*x) for f, (x, _) in zip(local_fns, a, strict=True)])(args)
    want = jax.jit(lambda a: [f(*x) for f, (_, x) in zip(single_fns, a, strict=True)])(args)
    for (reduction, loss, kind, all_ignored), g, w in zip(subcases, got, want, strict=True):
        what = f"{reduction} of {loss} loss, {kind} labels"
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            np.testing.assert_allclose(a, b, RTOL, ATOL, err_msg=what)
        if all_ignored:
            assert float(g[0]) == 0.0, what
            np.testing.assert_array_equal(g[1][0], 0.0, err_msg=what)


def log_softmax_float64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


def on_four_class_shards(local):
    """``local(z, y)`` inside ``shard_map`` on the 2×4 mesh: classes split in 4, rows whole."""
    return jax.jit(
        jax.shard_map(local, mesh=mesh((2, 4)), in_specs=(P(None, "model"), P()), out_specs=P())
    )


def test_label_smoothing_uses_the_global_class_count():
    """Each of 4 shards holds 6 classes, but the smoothing mass is spread over all 24.

    The loss is ``-(1 - eps) log a_y - (eps / K) sum_i log a_i`` with ``K = 24`` and the sum
    over every class. A shard that smooths over the classes it sees (``K = 6`` and its own sum,
    as Megatron-LM's vocab-parallel cross-entropy does) gets a different number on each shard.
    """
    eps = 0.3
    z, y, _, _ = case("int")
    rows = np.array([0, 1, 7])
    z, y = np.where(np.isfinite(z[rows]), z[rows], -3.0).astype(np.float32), y[rows]
    got = on_four_class_shards(
        lambda z, y: [fn(z, y, label_smoothing=eps, axis_name="model") for fn in LOSSES.values()]
    )(z, y)
    log_a = log_softmax_float64(z)
    nll_y = -np.take_along_axis(log_a, y[:, None], -1)[:, 0]
    want = (1 - eps) * nll_y - eps / C * log_a.sum(-1)
    first_shard_only = (1 - eps) * nll_y - eps / (C // 4) * log_a[:, : C // 4].sum(-1)
    for loss, g in zip(LOSSES, got, strict=True):
        np.testing.assert_allclose(g, want, rtol=2e-6, err_msg=loss)
        assert not np.allclose(g, first_shard_only, rtol=1e-3), loss


def test_z_loss_uses_the_global_logsumexp():
    c = 0.5
    z, y, _, _ = case("int")
    z, y = z[[1, 7]], y[[1, 7]]
    got = on_four_class_shards(
        lambda z, y: [
            fn(z, y, z_loss=c, axis_name="model") - fn(z, y, axis_name="model")
            for fn in LOSSES.values()
        ]
    )(z, y)
    z64 = z.astype(np.float64)
    lse = z64.max(-1) + np.log(np.sum(np.exp(z64 - z64.max(-1, keepdims=True)), -1))
    for loss, g in zip(LOSSES, got, strict=True):
        np.testing.assert_allclose(g, c * lse**2, rtol=1e-5, err_msg=loss)


# ------------------------------------------------------------ plain jit with NamedSharding

AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def jit_step(fn, kind, kw):
    """Per-example loss, its VJP, and the gradient of the mean: everything a user would call."""

    def step(z, y, w, cot):
        loss, pullback = jax.vjp(lambda z, y: fn(z, y, where=w, **kw), z, y)
        grads = pullback(cot)
        mean_grad = jax.grad(lambda z: fn(z, y, where=w, reduction="mean", **kw))(z)
        return loss, tuple(grads[i] for i in argnums(kind)), mean_grad

    return step


@functools.cache
def jit_program():
    steps = []
    for loss, kind in SUBCASES:
        steps.append(jit_step(LOSSES[loss], kind, options("all", kind)))  # mask: an argument
    return jax.jit(lambda args: [s(*a) for s, a in zip(steps, args, strict=True)])


# Auto on (8, 1) is plain data parallelism (the class axis is not split); explicit on (8, 1)
# still takes the mapped path, over a mesh axis of size 1.
JIT_CASES = [("auto", (2, 4)), ("auto", (1, 8))] + [("explicit", shape) for shape in MESHES]


@pytest.mark.parametrize(("axis_type", "mesh_shape"), JIT_CASES, ids=case_id)
def test_jit_with_named_sharding_matches_single_device(axis_type, mesh_shape):
    """Rows over "data", classes over "model", no ``axis_name``: the single-device result.

    With ``Auto`` axes XLA propagates the sharding; with ``Explicit`` axes the losses see it in
    the types and map themselves over the class shards. Either way only per-row statistics
    cross devices, and the gradient keeps the logits' sharding.
    """
    program = jit_program()
    single, sharded = [], []
    m = mesh(mesh_shape, AXIS_TYPES[axis_type])
    full, row = P("data", "model"), P("data")
    for _, kind in SUBCASES:
        z, y, mask, cot = case(kind)
        single.append((z, y, mask, cot))
        sharded.append(put(m, (z, y, mask, cot), (full, row if kind == "int" else full, full, row)))
    want = program(single)
    compiled = program.lower(sharded).compile()
    got = compiled(sharded)

    for (loss, kind), g, w in zip(SUBCASES, got, want, strict=True):
        what = f"{loss} loss, {kind} labels"
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            np.testing.assert_allclose(a, b, RTOL, ATOL, True, err_msg=what)
        np.testing.assert_array_equal(np.isnan(g[0]), bad_rows(kind, "all"), err_msg=what)
        assert g[1][0].sharding.spec == g[2].sharding.spec == full, what
    assert_moves_row_statistics_only(compiled, B, C, expect_any=mesh_shape[1] > 1)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("classes", [1024, 1000])  # 256 per shard, and 250 (not whole blocks)
def test_jit_on_wide_rows_matches_one_device_and_moves_little(classes, axis_type):
    """Rows of 256 classes or more are summed in blocks (``_numerics._split_blocks``).

    With ``Explicit`` axes the functions see the split in the types and move one number per
    row. With ``Auto`` axes XLA partitions the block sums itself: when every shard holds whole
    blocks it also moves, per row, the block with the label or a max entry (at most 128
    numbers); when shards cut through blocks it gathers the class axis (documented on the
    docs page "Scaling out"). Values match a single device in every case.
    """
    m = mesh((2, 4), AXIS_TYPES[axis_type])
    rows = 16
    rng = np.random.default_rng(classes)
    z = (rng.normal(size=(rows, classes)) * 3).astype(np.float32)
    y = rng.integers(0, classes, rows).astype(np.int32)
    z[0, y[0]] += 80.0  # a confident row: its loss is near 1e-30

    def program(z, y):
        fused = jax.value_and_grad(lambda z: jsm.fused_cross_entropy(z, y, reduction="sum"))(z)
        ref = jax.value_and_grad(lambda z: jsm.cross_entropy(z, y, reduction="sum"))(z)
        return fused, ref, jsm.fused_cross_entropy(z, y), jsm.log_softmax(z), jsm.softmax(z)

    want = jax.jit(program)(z, y)
    args = put(m, (z, y), (P("data", "model"), P("data")))
    compiled = jax.jit(program).lower(*args).compile()
    for g, w in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    if axis_type == "auto" and (classes // 4) % _numerics._BLOCK:
        return  # shards cut through blocks: XLA gathers the class axis
    per_row = 1 if axis_type == "explicit" else _numerics._BLOCK
    for op, shape in collective_arrays(compiled.as_text()):
        assert math.prod(shape) <= per_row * rows and classes not in shape, (op, shape)
        assert classes // 4 not in shape, (op, shape)


def test_explicit_sharding_works_eagerly_with_host_labels():
    """Labels and mask given as NumPy arrays next to sharded logits, outside any ``jit``."""
    z, y, mask, _ = case("int")
    m = mesh((2, 4), AxisType.Explicit)
    zs = jax.device_put(z, NamedSharding(m, P("data", "model")))
    kw = dict(where=mask, label_smoothing=0.1, ignore_index=IGNORE)
    for loss, fn in LOSSES.items():
        got = fn(zs, y, **kw)
        want = jax.jit(functools.partial(fn, **kw))(z, y)
        np.testing.assert_allclose(got, want, RTOL, ATOL, True, err_msg=loss)
        assert got.sharding.spec == P("data"), loss


def test_explicit_class_sharding_is_detected_from_the_type():
    z, y, _, _ = case("int")
    m = mesh((2, 4), AxisType.Explicit)
    opts = dict(
        axis=-1,
        where=None,
        label_smoothing=0.0,
        ignore_index=None,
        z_loss=0.0,
        reduction="none",
        axis_name=None,
    )

    def axes(z, **extra):
        return _sharding.class_mesh_axes(_targets.parse(z, y, **{**opts, **extra}))

    def put_z(spec):
        return jax.device_put(z, NamedSharding(m, spec))

    assert axes(put_z(P("data", "model"))) == "model"
    assert axes(put_z(P(None, ("data", "model")))) == ("data", "model")
    assert axes(put_z(P("model", None))) is None  # rows split, classes whole: nothing to do
    assert axes(jax.device_put(z.T, NamedSharding(m, P("model"))), axis=0) == "model"
    assert axes(z) is None
    assert axes(jax.device_put(z, NamedSharding(mesh((2, 4)), P("data", "model")))) is None


def test_explicit_class_axis_over_two_mesh_axes():
    """Classes split over both mesh axes at once: ``axis_name`` becomes a tuple of names."""
    z, y, mask, cot = case("int")
    kw = dict(where=mask, label_smoothing=0.1, z_loss=0.01, ignore_index=IGNORE)
    step = jax.jit(
        lambda z: [
            jax.value_and_grad(lambda z, fn=fn: jnp.sum(fn(z, y, **kw) * cot))(z)
            for fn in LOSSES.values()
        ]
    )
    spec = P(None, ("data", "model"))
    zs = jax.device_put(z, NamedSharding(mesh((2, 4), AxisType.Explicit), spec))
    compiled = step.lower(zs).compile()
    got, want = compiled(zs), step(z)
    for loss, (value, grad), (want_value, want_grad) in zip(LOSSES, got, want, strict=True):
        np.testing.assert_allclose(value, want_value, RTOL, equal_nan=True, err_msg=loss)
        np.testing.assert_allclose(grad, want_grad, RTOL, ATOL, True, err_msg=loss)
        assert grad.sharding.spec == spec, loss
    assert_moves_row_statistics_only(compiled, B, C, expect_any=True)


NORMALIZERS = ("softmax", "log_softmax", "logsumexp")


@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_normalizers_with_named_sharding_match_single_device(axis_type):
    """softmax, log_softmax and logsumexp with a class mask, classes split 4 ways."""
    z, _, mask, _ = case("int")

    def vjp(name, z, w):
        fn = getattr(jsm, name)
        out, pullback = jax.vjp(lambda z: fn(z, axis=-1, where=w), z)
        ct = jnp.where(jnp.isfinite(out), out, 0.0)  # a cotangent that varies by entry
        return out, pullback(ct)[0]

    step = jax.jit(lambda z, w: [vjp(name, z, w) for name in NORMALIZERS])
    m = mesh((2, 4), AXIS_TYPES[axis_type])
    args = put(m, (z, mask), (P("data", "model"),) * 2)
    compiled = step.lower(*args).compile()
    got, want = compiled(*args), step(z, mask)
    for name, g, w in zip(NORMALIZERS, got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            np.testing.assert_allclose(a, b, RTOL, ATOL, err_msg=name)
    assert_moves_row_statistics_only(compiled, B, C, expect_any=True)


# ------------------------------------------------------------------------ linear_cross_entropy

needs_linear = pytest.mark.skipif(
    not hasattr(jsm, "linear_cross_entropy"), reason="jsm.linear_cross_entropy is not exported"
)
N, D, V = 16, 12, 40  # tokens, hidden size, vocabulary (V splits over 1, 2, 4 and 8 devices)
LINEAR_OPTIONS = dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=0.01, chunk_size=4)
LINEAR_SPECS = (P("data", None), P(None, "model"), P("model"), P("data"))  # x, w, bias, labels


@functools.cache
def linear_case():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) * 0.5).astype(np.float32)
    b = (rng.normal(size=(V,)) * 0.1).astype(np.float32)
    y = rng.integers(0, V, size=N).astype(np.int32)
    y[0], y[1], y[3] = 0, V - 1, IGNORE  # first and last shard, and an ignored row
    cot = np.arange(1, N + 1, dtype=np.float32)
    return x, w, b, y, cot


def linear_grads(x, w, b, y, cot, axis_name=None):
    """``"none"`` with a per-row cotangent, and ``"mean"``: values and (x, w, bias) gradients."""

    def per_row(x, w, b):
        return jsm.linear_cross_entropy(
            x, w, y, bias=b, reduction="none", axis_name=axis_name, **LINEAR_OPTIONS
        )

    def mean(x, w, b):
        if axis_name is None:
            return jsm.linear_cross_entropy(x, w, y, bias=b, reduction="mean", **LINEAR_OPTIONS)
        # Inside the map the rows are split over "data": the global mean needs its psum.
        count = jax.lax.psum(jnp.sum(y != IGNORE), "data")
        return jax.lax.psum(jnp.sum(per_row(x, w, b)), "data") / count

    rows, pullback = jax.vjp(per_row, x, w, b)
    return (rows, pullback(cot)), jax.value_and_grad(mean, (0, 1, 2))(x, w, b)


def assert_vocabulary_stays_split(compiled, mesh_shape):
    """No collective carries the whole vocabulary (when it is split at all).

    The backward pass does move ``[rows, D]`` partial ``dx`` over the vocabulary shards and
    ``[D, V / shards]`` partial ``dw`` over the row shards, as any data- and vocab-parallel
    step must; those never have a dimension of size V.
    """
    if mesh_shape[1] == 1:
        return
    for op, shape in collective_arrays(compiled.as_text()):
        assert V not in shape, f"{op} of shape {shape} carries the vocabulary"


@functools.cache
def linear_single_device():
    return jax.jit(linear_grads)(*linear_case())


@needs_linear
@pytest.mark.parametrize("mesh_shape", MESHES, ids=case_id)
def test_linear_axis_name_matches_unsharded(mesh_shape):
    """x and labels split by rows over "data", w and bias by vocabulary over "model"."""
    m = mesh(mesh_shape)
    x_spec, w_spec, b_spec, row = LINEAR_SPECS
    grad_specs = (x_spec, w_spec, b_spec)
    mapped = jax.shard_map(
        functools.partial(linear_grads, axis_name="model"),
        mesh=m,
        in_specs=(*LINEAR_SPECS, row),
        out_specs=((row, grad_specs), (P(), grad_specs)),
    )
    args = put(m, linear_case(), (*LINEAR_SPECS, row))
    compiled = jax.jit(mapped).lower(*args).compile()
    got = compiled(*args)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(linear_single_device()), strict=True):
        np.testing.assert_allclose(g, v, rtol=2e-5, atol=2e-6)
    assert_vocabulary_stays_split(compiled, mesh_shape)


@needs_linear
@pytest.mark.parametrize("mesh_shape", MESHES, ids=case_id)
@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_linear_jit_with_named_sharding_matches_single_device(axis_type, mesh_shape):
    """x by rows, w and bias by vocabulary, no ``axis_name``: the single-device result.

    ``Auto`` axes leave the split to XLA's propagation. ``Explicit`` axes need
    ``linear_cross_entropy`` to hand such inputs to ``jsoftmax._sharding.linear_over_mesh``.
    """
    m = mesh(mesh_shape, AXIS_TYPES[axis_type])
    args = put(m, linear_case(), (*LINEAR_SPECS, P("data")))
    program = jax.jit(linear_grads)
    compiled = program.lower(*args).compile()
    got = compiled(*args)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(linear_single_device()), strict=True):
        np.testing.assert_allclose(g, v, rtol=2e-5, atol=2e-6)
    (_, (_, dw, _)), (_, (_, dw_mean, _)) = got
    for g in (dw, dw_mean):
        assert g.sharding.is_equivalent_to(NamedSharding(m, P(None, "model")), 2), g.sharding
    assert_vocabulary_stays_split(compiled, mesh_shape)


@needs_linear
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("axis_type", list(AXIS_TYPES))
def test_linear_keeps_a_vocabulary_of_several_tiles_split(axis_type, reduction):
    """A vocabulary of several tiles per shard (4096 over 2 shards, tiles of 512 or 2048).

    Explicit axes: the walks run on each shard's own columns. Auto axes: the head sees a mesh
    whose split it cannot read, and takes whole rows with plain reductions, which XLA's
    partitioner splits along the vocabulary. Either way no collective carries the vocabulary."""
    vocab, tokens, dim = 4096, 16, 8
    rng = np.random.default_rng(3)
    x = rng.normal(size=(tokens, dim)).astype(np.float32)
    w = rng.normal(size=(dim, vocab)).astype(np.float32)
    y = rng.integers(0, vocab, tokens).astype(np.int32)

    def f(x, w):
        return jnp.sum(jsm.linear_cross_entropy(x, w, y, reduction=reduction))

    want = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    m = mesh((2, 2), AXIS_TYPES[axis_type])
    args = put(m, (x, w), (P("data", None), P(None, "model")))
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    got = compiled(*args)
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, v, rtol=2e-5, atol=2e-6)
    for op, shape in collective_arrays(compiled.as_text()):
        assert vocab not in shape, f"{op} of shape {shape} carries the vocabulary"
