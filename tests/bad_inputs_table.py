"""What every public function does with bad input, as data.

Two tables, each row checked by ``tests/test_bad_inputs.py`` and rendered into the docs page
"What bad input gets" by ``experiments/bad_input_table.py``:

* :data:`BAD_CALLS`: malformed calls. Each raises ``TypeError`` or ``ValueError`` while JAX
  traces, eagerly and under ``jax.jit``, with the offending argument's name first.
* :data:`EDGE_VALUES`: inputs that are well-formed but outside the happy path (bad label values,
  empty rows, ``-inf``/``NaN``/``+inf`` logits), and the argument forms of ``jax.nn`` that were
  refused before the normalizers took all of them (integer and complex inputs, empty and 0-d
  arrays, ``axis`` tuples and None). The contract answers them with values: a NaN example,
  ``+inf``, ``0``, ``-inf``, an empty array, never an error.
* :data:`CLI_CALLS`: bad command lines of ``python -m jsoftmax verify``: exit status 2 and an
  ``argparse`` error line naming the flag.

Only NumPy is imported here, so the docs' generator can read the table without JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

NORMALIZERS = ("softmax", "log_softmax", "logsumexp", "softmax_jacobian")
MASKED_NORMALIZERS = ("softmax", "log_softmax", "logsumexp")  # the ones that take ``where``
LOSSES = ("cross_entropy", "fused_cross_entropy")
OPTAX_LOSSES = ("softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels")
LINEAR = "linear_cross_entropy"
CHECK_LABELS = "check_labels"
CLI = "python -m jsoftmax verify"

INF, NAN = np.inf, np.nan


def _frozen(a: Any) -> np.ndarray:
    a = np.array(a)
    a.flags.writeable = False
    return a


# Small, well-formed inputs; each bad call changes one thing.
X = _frozen(np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]], np.float32))  # [2, 3]
Y_INT = _frozen(np.array([2, 0], np.int32))  # [2]
Y_FLOAT = _frozen(np.full((2, 3), 1 / 3, np.float32))  # [2, 3]
H = _frozen(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5]], np.float32))  # [4, 2]
W = _frozen(np.array([[1.0, -1.0, 0.5, 0.0, 2.0], [0.0, 1.0, -0.5, 1.0, 0.0]], np.float32))
Y_LIN = _frozen(np.array([0, 1, 2, 4], np.int32))  # [4]


@dataclasses.dataclass(frozen=True)
class BadCall:
    """``function(*args, **kwargs)`` raises ``error`` with a message starting with ``message``."""

    kind: str  # what is wrong, as the table's "Input" column says it
    function: str  # the public name
    args: tuple
    kwargs: dict
    error: type
    message: str  # the start of the message: the argument's name, a colon, then the reason
    jit_only: bool = False  # the input is bad only when traced (a traced static option)

    @property
    def argument(self) -> str:
        return self.message.split(":", 1)[0]

    @property
    def id(self) -> str:
        detail = ",".join(f"{k}={_short(v)}" for k, v in self.kwargs.items())
        args = ",".join(_short(a) for a in self.args)
        return f"{self.function}({args}{',' if args and detail else ''}{detail})"


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"{v.dtype.name}{list(v.shape)}"
    return repr(v)


def _normalizer_calls() -> list[BadCall]:
    rows = []
    for f in NORMALIZERS:
        # add() is called only within this iteration, so it sees this iteration's f.
        def add(kind, args, kwargs, error, message, fns=NORMALIZERS):
            if f in fns:  # noqa: B023
                rows.append(BadCall(kind, f, args, kwargs, error, message))  # noqa: B023

        x = "a" if f == "logsumexp" else "x"  # the array argument's name
        add(
            "logits of a boolean dtype",
            (X > 1,),
            {},
            TypeError,
            f"{x}: expected a floating-point dtype",
        )
        add(
            "logits of a complex dtype",
            (X.astype(np.complex64),),
            {},
            TypeError,
            "x: expected a floating-point dtype",
            ("softmax_jacobian",),
        )
        add(
            "logits that are not an array (None, str)",
            (None,),
            {},
            TypeError,
            f"{x}: expected a floating-point array, got NoneType",
        )
        add(
            "logits that are not an array (None, str)",
            ("abc",),
            {},
            TypeError,
            f"{x}: expected a floating-point array, got str",
        )
        add(
            "class axis of size 0",
            (np.zeros((2, 0), np.float32),),
            {},
            ValueError,
            "x: the class axis (axis 1 of shape (2, 0)) has size 0",
            ("softmax_jacobian",),
        )
        add(
            "scalar logits with an int axis",
            (np.float32(1.0),),
            {"axis": -1} if f == "logsumexp" else {},
            ValueError,
            "axis: -1 is out of range for an array of rank 0",
            MASKED_NORMALIZERS,
        )
        add(
            "scalar logits with an int axis",
            (np.float32(1.0),),
            {},
            ValueError,
            "x: expected an array with a class axis, got a scalar",
            ("softmax_jacobian",),
        )
        add(
            "axis out of range",
            (X,),
            {"axis": 2},
            ValueError,
            "axis: 2 is out of range for an array of rank 2",
        )
        add(
            "axis out of range",
            (X,),
            {"axis": -3},
            ValueError,
            "axis: -3 is out of range for an array of rank 2",
        )
        add(
            "axis that is not an int, a tuple of ints or None",
            (X,),
            {"axis": 1.0},
            TypeError,
            "axis: expected an int, a tuple of ints or None, got float",
            MASKED_NORMALIZERS,
        )
        add(
            "axis that is not an int, a tuple of ints or None",
            (X,),
            {"axis": (0, "1")},
            TypeError,
            "axis: expected an int, a tuple of ints or None, got str",
            MASKED_NORMALIZERS,
        )
        add(
            "axis with a repeated entry",
            (X,),
            {"axis": (1, -1)},
            ValueError,
            "axis: repeated axis in (1, -1)",
            MASKED_NORMALIZERS,
        )
        for axis in (1.0, (0, 1), None):
            add(
                "axis that is not an int (float, tuple, None), for softmax_jacobian",
                (X,),
                {"axis": axis},
                TypeError,
                f"axis: expected an int, got {type(axis).__name__}",
                ("softmax_jacobian",),
            )
        add(
            "where that is not boolean",
            (X,),
            {"where": np.ones((2, 3), np.int32)},
            TypeError,
            "where: expected a boolean array, got dtype int32",
            MASKED_NORMALIZERS,
        )
        add(
            "where that is not boolean",
            (X,),
            {"where": np.ones(3, np.float32)},
            TypeError,
            "where: expected a boolean array, got dtype float32",
            MASKED_NORMALIZERS,
        )
        add(
            "where that does not broadcast with the logits",
            (X,),
            {"where": np.ones(2, bool)},
            ValueError,
            "where: shape (2,) does not broadcast with the input's shape (2, 3)",
            MASKED_NORMALIZERS,
        )
        add(
            "where that does not broadcast with the logits",
            (X,),
            {"where": np.ones((4, 3, 3), bool)},
            ValueError,
            "where: shape (4, 3, 3) does not broadcast with the input's shape (2, 3)",
            MASKED_NORMALIZERS,
        )
        add(
            "b that does not broadcast with a, or not a number",
            (X,),
            {"b": np.ones(2, np.float32)},
            ValueError,
            "b: shape (2,) does not broadcast with the input's shape (2, 3)",
            ("logsumexp",),
        )
        add(
            "b that does not broadcast with a, or not a number",
            (X,),
            {"b": np.ones((2, 3), bool)},
            TypeError,
            "b: expected a floating-point dtype",
            ("logsumexp",),
        )
    return rows


def _loss_calls() -> list[BadCall]:
    rows = []
    for f in LOSSES:
        # add() is called only within this iteration, so it sees this iteration's f.
        def add(kind, args, kwargs, error, message, jit_only=False):
            rows.append(BadCall(kind, f, args, kwargs, error, message, jit_only))  # noqa: B023

        add(
            "logits of an integer dtype",
            (X.astype(np.int32), Y_INT),
            {},
            TypeError,
            "logits: expected a floating-point dtype",
        )
        add(
            "logits of a complex dtype",
            (X.astype(np.complex64), Y_INT),
            {},
            TypeError,
            "logits: expected a floating-point dtype",
        )
        add(
            "logits that are not an array (None, str)",
            (None, Y_INT),
            {},
            TypeError,
            "logits: expected a floating-point array, got NoneType",
        )
        add(
            "class axis of size 0",
            (np.zeros((2, 0), np.float32), Y_INT),
            {},
            ValueError,
            "logits: the class axis (axis 1 of shape (2, 0)) has size 0",
        )
        add(
            "scalar logits (no class axis)",
            (np.float32(1.0), np.int32(0)),
            {},
            ValueError,
            "logits: expected an array with a class axis, got a scalar",
        )
        add(
            "integer labels of the wrong shape",
            (X, np.zeros((2, 3), np.int32)),
            {},
            ValueError,
            "labels: integer labels must have the logits' shape without the class "
            "axis, (2,), got (2, 3)",
        )
        add(
            "integer labels of the wrong shape",
            (X, np.zeros(3, np.int32)),
            {},
            ValueError,
            "labels: integer labels must have the logits' shape without the class axis",
        )
        add(
            "integer labels of the wrong shape",
            (X, Y_INT),
            {"axis": 0},
            ValueError,
            "labels: integer labels must have the logits' shape without the class axis, (3,)",
        )
        add(
            "float labels of the wrong shape",
            (X, np.zeros(2, np.float32)),
            {},
            ValueError,
            "labels: float labels must have the logits' shape (2, 3), got (2,)",
        )
        add(
            "float labels of the wrong shape",
            (X, np.zeros((3, 2), np.float32)),
            {},
            ValueError,
            "labels: float labels must have the logits' shape (2, 3), got (3, 2)",
        )
        add(
            "labels of a dtype that is neither integer nor float",
            (X, Y_INT > 0),
            {},
            TypeError,
            "labels: expected integer class ids or a float target distribution, got dtype bool",
        )
        add(
            "labels of a dtype that is neither integer nor float",
            (X, Y_FLOAT.astype(np.complex64)),
            {},
            TypeError,
            "labels: expected integer class ids or a float target distribution, got dtype "
            "complex64",
        )
        add(
            "labels that are not an array (None, list)",
            (X, None),
            {},
            TypeError,
            "labels: expected an array, got NoneType",
        )
        add(
            "labels that are not an array (None, list)",
            (X, [2, 0]),
            {},
            TypeError,
            "labels: expected an array, got list",
        )
        add(
            "axis out of range",
            (X, Y_INT),
            {"axis": 2},
            ValueError,
            "axis: 2 is out of range for an array of rank 2",
        )
        add(
            "axis that is not an int, a tuple of ints or None",
            (X, Y_INT),
            {"axis": 1.0},
            TypeError,
            "axis: expected an int, a tuple of ints or None, got float",
        )
        add(
            "axis with a repeated entry",
            (X, Y_FLOAT),
            {"axis": (1, -1)},
            ValueError,
            "axis: repeated axis in (1, -1)",
        )
        add(
            "axis=() (no class axis)",
            (X, Y_FLOAT),
            {"axis": ()},
            ValueError,
            "axis: expected at least one class axis, got ()",
        )
        add(
            "where that is not boolean",
            (X, Y_INT),
            {"where": np.ones((2, 3), np.float32)},
            TypeError,
            "where: expected a boolean array, got dtype float32",
        )
        add(
            "where that does not broadcast to the logits",
            (X, Y_INT),
            {"where": np.ones((3, 1), bool)},
            ValueError,
            "where: shape (3, 1) does not broadcast to the input's shape (2, 3)",
        )
        for eps in (1.0, -0.1, 1.5, NAN, INF):
            add(
                "label_smoothing outside [0, 1)",
                (X, Y_INT),
                {"label_smoothing": eps},
                ValueError,
                f"label_smoothing: must lie in [0, 1), got {eps!r}",
            )
        for eps in ("0.1", None, True):
            add(
                "label_smoothing or z_loss that is not a number",
                (X, Y_INT),
                {"label_smoothing": eps},
                TypeError,
                f"label_smoothing: expected a float, got {type(eps).__name__}",
            )
        add(
            "label_smoothing or z_loss traced under jit (not static)",
            (X, Y_INT),
            {"label_smoothing": np.float32(0.1)},
            TypeError,
            "label_smoothing: must be a static Python number, got a traced value",
            True,
        )
        for c in (-0.1, NAN, INF):
            add(
                "z_loss negative or not finite",
                (X, Y_INT),
                {"z_loss": c},
                ValueError,
                f"z_loss: must lie in [0, inf), got {c!r}",
            )
        add(
            "label_smoothing or z_loss that is not a number",
            (X, Y_INT),
            {"z_loss": "1e-4"},
            TypeError,
            "z_loss: expected a float, got str",
        )
        add(
            "label_smoothing or z_loss traced under jit (not static)",
            (X, Y_INT),
            {"z_loss": np.float32(0.1)},
            TypeError,
            "z_loss: must be a static Python number, got a traced value",
            True,
        )
        for r in ("avg", "Mean", None):
            add(
                "unknown reduction",
                (X, Y_INT),
                {"reduction": r},
                ValueError,
                f"reduction: must be one of ('none', 'sum', 'mean'), got {r!r}",
            )
        add(
            "ignore_index with float labels",
            (X, Y_FLOAT),
            {"ignore_index": -100},
            ValueError,
            "ignore_index: applies to integer labels only; got float labels",
        )
        add(
            "ignore_index that is not an int",
            (X, Y_INT),
            {"ignore_index": -100.0},
            TypeError,
            "ignore_index: expected an int or None, got float",
        )
        add(
            "ignore_index that is not an int",
            (X, Y_INT),
            {"ignore_index": True},
            TypeError,
            "ignore_index: expected an int or None, got bool",
        )
        add(
            "ignore_index outside the labels' dtype (uint8 labels, -100)",
            (X, Y_INT.astype(np.uint8)),
            {"ignore_index": -100},
            ValueError,
            "ignore_index: -100 cannot be represented in the labels' dtype uint8",
        )
        add(
            "ignore_index outside the labels' dtype (uint8 labels, -100)",
            (X, Y_INT),
            {"ignore_index": 2**40},
            ValueError,
            "ignore_index: 1099511627776 cannot be represented in the labels' dtype int32",
        )
        add(
            "axis_name that is not bound",
            (X, Y_INT),
            {"axis_name": "vocab"},
            ValueError,
            "axis_name: 'vocab' is not bound",
        )
    return rows


def _optax_loss_calls() -> list[BadCall]:
    sce, sce_int = OPTAX_LOSSES
    rows = []

    def add(kind, fns, args, kwargs, error, message):
        for f in fns:
            rows.append(BadCall(kind, f, args, kwargs, error, message))

    add(
        "logits of an integer dtype",
        OPTAX_LOSSES,
        (X.astype(np.int32), Y_INT),
        {},
        TypeError,
        "logits: expected a floating-point dtype",
    )
    add(
        "integer labels of the wrong shape",
        (sce_int,),
        (X, np.zeros(3, np.int32)),
        {},
        ValueError,
        "labels: integer labels must have the logits' shape without the class axis",
    )
    add(
        "float labels of the wrong shape",
        (sce,),
        (X, np.zeros((3, 2), np.float32)),
        {},
        ValueError,
        "labels: shape (3, 2) does not broadcast with the logits' shape (2, 3)",
    )
    add(
        "labels of a dtype that is neither integer nor float",
        (sce,),
        (X, Y_FLOAT.astype(np.complex64)),
        {},
        TypeError,
        "labels: expected a float target distribution, got dtype complex64",
    )
    add(
        "labels of a float or boolean dtype",
        (sce_int,),
        (X, Y_FLOAT),
        {},
        TypeError,
        "labels: expected integer class ids, got float32",
    )
    add(
        "axis that is not an int, a tuple of ints or None",
        (sce_int,),
        (X, Y_INT),
        {"axis": None},
        TypeError,
        "axis: expected an int or a tuple of ints, got NoneType",
    )
    add(
        "axis out of range",
        OPTAX_LOSSES,
        (X, Y_INT),
        {"axis": 2},
        ValueError,
        "axis: 2 is out of range for an array of rank 2",
    )
    add(
        "where that does not broadcast to the logits",
        OPTAX_LOSSES,
        (X, Y_INT),
        {"where": np.ones(3, bool)},
        ValueError,
        "where: shape (3, 1) does not broadcast to the input's shape (2, 3)",
    )
    add(
        "where of a rank that is neither the logits' nor per-example",
        OPTAX_LOSSES,
        (X, Y_INT),
        {"where": np.ones((1, 2, 3), bool)},
        ValueError,
        "where: shape (1, 2, 3) is neither the logits' rank nor a per-example mask",
    )
    return [r if r.function == sce_int or r.args[1] is not Y_INT else _with_float(r) for r in rows]


def _with_float(row: BadCall) -> BadCall:
    """The same bad call with float labels (softmax_cross_entropy takes a distribution)."""
    return dataclasses.replace(row, args=(row.args[0], Y_FLOAT) + row.args[2:])


def _check_labels_calls() -> list[BadCall]:
    f = CHECK_LABELS
    rows = [
        BadCall(
            "labels of a float or boolean dtype",
            f,
            (Y_FLOAT, 3),
            {},
            TypeError,
            "labels: expected an integer array, got float32",
        ),
        BadCall(
            "labels of a float or boolean dtype",
            f,
            (Y_INT > 0, 3),
            {},
            TypeError,
            "labels: expected an integer array, got bool",
        ),
        BadCall(
            "labels that are not an array (None, list)",
            f,
            ([0, 1], 3),
            {},
            TypeError,
            "labels: expected an integer array, got list",
        ),
        BadCall(
            "num_classes not a positive int",
            f,
            (Y_INT, 0),
            {},
            ValueError,
            "num_classes: must be a positive int, got 0",
        ),
        BadCall(
            "num_classes not a positive int",
            f,
            (Y_INT, -3),
            {},
            ValueError,
            "num_classes: must be a positive int, got -3",
        ),
        BadCall(
            "num_classes not a positive int",
            f,
            (Y_INT, 3.0),
            {},
            TypeError,
            "num_classes: expected a positive int, got float 3.0",
        ),
        BadCall(
            "num_classes not a positive int",
            f,
            (Y_INT, None),
            {},
            TypeError,
            "num_classes: expected a positive int, got NoneType None",
        ),
        BadCall(
            "num_classes not a positive int",
            f,
            (Y_INT, np.int32(3)),
            {},
            TypeError,
            "num_classes: must be a static Python int, got a traced value",
            True,
        ),
        BadCall(
            "ignore_index that is not an int",
            f,
            (Y_INT, 3),
            {"ignore_index": -1.0},
            TypeError,
            "ignore_index: expected an int or None, got float",
        ),
        BadCall(
            "ignore_index outside the labels' dtype (uint8 labels, -100)",
            f,
            (Y_INT.astype(np.uint8), 3),
            {"ignore_index": -100},
            ValueError,
            "ignore_index: -100 cannot be represented in the labels' dtype uint8",
        ),
    ]
    return rows


def _linear_calls() -> list[BadCall]:
    f = LINEAR
    rows = []

    def add(kind, args, kwargs, error, message):
        rows.append(BadCall(kind, f, args, kwargs, error, message))

    add(
        "logits of an integer dtype",
        (H.astype(np.int32), W, Y_LIN),
        {},
        TypeError,
        "x: must be a floating array, got dtype int32",
    )
    add(
        "scalar logits (no class axis)",
        (np.float32(1.0), W, np.int32(0)),
        {},
        ValueError,
        "x: must have shape [..., D], got a scalar",
    )
    add(
        "w or bias of a non-float dtype",
        (H, W.astype(np.int32), Y_LIN),
        {},
        TypeError,
        "w: must be a floating array, got dtype int32",
    )
    add(
        "w or bias of a non-float dtype",
        (H, W, Y_LIN),
        {"bias": np.zeros(5, np.int32)},
        TypeError,
        "bias: must be a floating array, got dtype int32",
    )
    add(
        "w that does not fit x ([D, V] expected)",
        (H, W.T, Y_LIN),
        {},
        ValueError,
        "w: shape (5, 2) does not fit x of shape (4, 2); expected [2, V]",
    )
    add(
        "w that does not fit x ([D, V] expected)",
        (H, W[0], Y_LIN),
        {},
        ValueError,
        "w: shape (5,) does not fit x of shape (4, 2)",
    )
    add(
        "bias that does not fit w ([V] expected)",
        (H, W, Y_LIN),
        {"bias": np.zeros(4, np.float32)},
        ValueError,
        "bias: shape (4,) does not fit w of shape (2, 5); expected (5,)",
    )
    add(
        "bias that does not fit w ([V] expected)",
        (H, W, Y_LIN),
        {"bias": np.zeros((1, 5), np.float32)},
        ValueError,
        "bias: shape (1, 5) does not fit w of shape (2, 5)",
    )
    add(
        "labels of a float or boolean dtype",
        (H, W, Y_LIN.astype(np.float32)),
        {},
        TypeError,
        "labels: must be integer class ids, got dtype float32",
    )
    add(
        "integer labels of the wrong shape",
        (H, W, Y_LIN[:3]),
        {},
        ValueError,
        "labels: shape (3,) does not match x.shape[:-1] = (4,)",
    )
    for n in (0, -8):
        add(
            "chunk_size <= 0 or not an int",
            (H, W, Y_LIN),
            {"chunk_size": n},
            ValueError,
            f"chunk_size: must be positive, got {n}",
        )
    for n in (2.5, True):
        add(
            "chunk_size <= 0 or not an int",
            (H, W, Y_LIN),
            {"chunk_size": n},
            TypeError,
            f"chunk_size: must be a positive int or None, got {n!r}",
        )
    for cap in (0.0, -1.0, INF, NAN):
        add(
            "softcap <= 0 or not finite",
            (H, W, Y_LIN),
            {"softcap": cap},
            ValueError,
            f"softcap: must be None or finite and > 0, got {cap}",
        )
    add(
        "label_smoothing outside [0, 1)",
        (H, W, Y_LIN),
        {"label_smoothing": 1.0},
        ValueError,
        "label_smoothing: must lie in [0, 1), got 1.0",
    )
    add(
        "z_loss negative or not finite",
        (H, W, Y_LIN),
        {"z_loss": -1.0},
        ValueError,
        "z_loss: must lie in [0, inf), got -1.0",
    )
    add(
        "unknown reduction",
        (H, W, Y_LIN),
        {"reduction": "avg"},
        ValueError,
        "reduction: must be one of ('none', 'sum', 'mean'), got 'avg'",
    )
    add(
        "ignore_index that is not an int",
        (H, W, Y_LIN),
        {"ignore_index": -100.0},
        TypeError,
        "ignore_index: must be an int or None, got -100.0",
    )
    add(
        "axis_name that is not bound",
        (H, W, Y_LIN),
        {"axis_name": "vocab"},
        ValueError,
        "axis_name: 'vocab' is not a bound mesh axis",
    )
    return rows


BAD_CALLS: tuple[BadCall, ...] = tuple(
    _normalizer_calls()
    + _loss_calls()
    + _optax_loss_calls()
    + _check_labels_calls()
    + _linear_calls()
)


@dataclasses.dataclass(frozen=True)
class CliCall:
    """``python -m jsoftmax <argv>`` exits with status 2; stderr's error line starts so."""

    kind: str
    argv: tuple[str, ...]
    message: str  # the start of what follows "error: " on stderr

    @property
    def id(self) -> str:
        return " ".join(self.argv) or "<no arguments>"


CLI_CALLS: tuple[CliCall, ...] = (
    CliCall(
        "unknown --device",
        ("verify", "--device", "xpu"),
        "argument --device: invalid choice: 'xpu'",
    ),
    CliCall(
        "unknown --dtype",
        ("verify", "--dtype", "float99"),
        "--dtype: expected a comma-separated list of float32, bfloat16, float64, got 'float99'",
    ),
    CliCall(
        "unknown --dtype", ("verify", "--dtype", ","), "--dtype: expected a comma-separated list"
    ),
    CliCall(
        "unknown --function",
        ("verify", "--function", "softmaxx"),
        "--function: unknown function 'softmaxx'",
    ),
    CliCall(
        "--json without a path", ("verify", "--json"), "argument --json: expected one argument"
    ),
    CliCall("unknown flag or command", ("verify", "--fast"), "unrecognized arguments: --fast"),
    CliCall("unknown flag or command", ("check",), "argument command: invalid choice: 'check'"),
    CliCall("unknown flag or command", (), "the following arguments are required: command"),
)


# ------------------------------------------------------------------------------------ values


@dataclasses.dataclass(frozen=True)
class EdgeValue:
    """``function(*args, **kwargs)`` answers with a value (no error).

    ``row`` is the example the edge sits in (None: the whole result, for reductions).
    ``value`` is what that example's result is: ``"nan"``, ``"+inf"``, ``"0"``, ``"-inf"``,
    ``"finite"``, ``"empty"`` (no element). ``grad`` is what the gradient with respect to the
    first argument is in that example: ``"nan"``, ``"0"``, ``"finite"`` or None (not checked).
    Every other example must stay finite in value and gradient, and where ``clean`` is given,
    equal bit for bit to those of ``function(*clean, **kwargs)``.
    """

    kind: str
    result: str  # the table's "Result" column
    function: str
    args: tuple
    kwargs: dict
    row: int | None
    value: str
    grad: str | None
    clean: tuple | None = None  # the same call with the edge removed: other examples must match

    @property
    def id(self) -> str:
        return f"{self.function}:{self.kind}"


def _rows(*rows) -> np.ndarray:
    return _frozen(np.array(rows, np.float32))


_FINITE = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 2.0, 0.0]]
_NAN_ROW = _rows(_FINITE[0], [0.5, NAN, 0.0], _FINITE[2])
_POSINF_ROW = _rows(_FINITE[0], [0.5, INF, 0.0], _FINITE[2])
_NEGINF_ROW = _rows(_FINITE[0], [-INF, -INF, -INF], _FINITE[2])
_HUGE = _rows([1e30, -1e30, 0.0], [-3e5, 3e5, 3e5], [1e-30, -1e-30, 0.0])
_LOGITS = _rows(*_FINITE)
_EMPTY_MASK = _frozen(np.array([[True] * 3, [False] * 3, [True] * 3]))
_Y3 = _frozen(np.array([0, 1, 2], np.int32))
_XL_NAN = _frozen(np.where(np.arange(4)[:, None] == 1, np.float32([NAN, 1.0]), H))


def _edge_values() -> list[EdgeValue]:
    rows = []

    def add(kind, result, fns, args, kwargs, row, value, grad, clean=None):
        for f in fns:
            rows.append(EdgeValue(kind, result, f, args, kwargs, row, value, grad, clean))

    # Normalizers.
    empty = "softmax 0; log_softmax, logsumexp -inf; loss 0; gradient 0 (never NaN)"
    add(
        "row with nothing included (where all False)",
        empty,
        ("softmax",),
        (_LOGITS,),
        {"axis": -1, "where": _EMPTY_MASK},
        1,
        "0",
        "0",
    )
    add(
        "row with nothing included (where all False)",
        empty,
        ("log_softmax", "logsumexp"),
        (_LOGITS,),
        {"axis": -1, "where": _EMPTY_MASK},
        1,
        "-inf",
        "0",
    )
    empty_inf = "softmax, softmax_jacobian 0; log_softmax, logsumexp -inf; loss 0; gradient 0"
    add(
        "row of all -inf logits",
        empty_inf,
        ("softmax", "softmax_jacobian"),
        (_NEGINF_ROW,),
        {"axis": -1},
        1,
        "0",
        "0",
    )
    add(
        "row of all -inf logits",
        empty_inf,
        ("log_softmax", "logsumexp"),
        (_NEGINF_ROW,),
        {"axis": -1},
        1,
        "-inf",
        "0",
    )
    nan_row = "NaN in that example's value and gradient; every other example unchanged"
    add("NaN logit", nan_row, NORMALIZERS, (_NAN_ROW,), {"axis": -1}, 1, "nan", "nan", (_LOGITS,))
    add(
        "+inf logit",
        nan_row + " (as jax.nn)",
        ("softmax", "log_softmax", "softmax_jacobian"),
        (_POSINF_ROW,),
        {"axis": -1},
        1,
        "nan",
        "nan",
        (_LOGITS,),
    )
    add(
        "+inf logit",
        "+inf in that example (as jax.nn and scipy), NaN gradient at the +inf entry; every "
        "other example unchanged",
        ("logsumexp",),
        (_POSINF_ROW,),
        {"axis": -1},
        1,
        "+inf",
        "nan",
        (_LOGITS,),
    )
    huge = "finite value and gradient"
    add(
        "huge or tiny finite logits (±1e30, ±3e5, ±1e-30)",
        huge,
        NORMALIZERS,
        (_HUGE,),
        {"axis": -1},
        0,
        "finite",
        "finite",
    )
    # Calls refused before jsoftmax followed jax.nn's argument forms, answered as jax.nn does.
    add(
        "logits of an integer dtype",
        "converted to float32 (float64 for 64-bit integers) first, as jax.nn does",
        NORMALIZERS,
        (X.astype(np.int32),),
        {},
        None,
        "finite",
        None,
    )
    add(
        "logits of a complex dtype",
        "computed in complex arithmetic, as jax.nn does",
        MASKED_NORMALIZERS,
        (X.astype(np.complex64),),
        {"axis": -1},
        None,
        "finite",
        None,
    )
    add(
        "class axis of size 0",
        "an empty result (softmax, log_softmax); logsumexp -inf (an empty sum), as jax.nn",
        ("softmax", "log_softmax"),
        (_frozen(np.zeros((2, 0), np.float32)),),
        {},
        None,
        "empty",
        None,
    )
    add(
        "class axis of size 0",
        "an empty result (softmax, log_softmax); logsumexp -inf (an empty sum), as jax.nn",
        ("logsumexp",),
        (_frozen(np.zeros((2, 0), np.float32)),),
        {"axis": -1},
        None,
        "-inf",
        None,
    )
    scalar = "softmax 1, log_softmax 0, logsumexp the input, as jax.nn"
    add(
        "scalar logits with axis=None (logsumexp's default)",
        scalar,
        MASKED_NORMALIZERS,
        (_frozen(np.float32(1.5)),),
        {"axis": None},
        None,
        "finite",
        "finite",
    )
    for axis in ((0, 1), None):
        add(
            "axis a tuple of ints or None",
            "normalized over those axes together (None: all), as jax.nn",
            MASKED_NORMALIZERS,
            (_LOGITS,),
            {"axis": axis},
            None,
            "finite",
            "finite",
        )
    add(
        "where of higher rank than the logits",
        "the logits are broadcast to where's shape, as jax.nn does",
        MASKED_NORMALIZERS,
        (_LOGITS,),
        {"axis": -1, "where": _frozen(np.ones((2, 3, 3), bool))},
        None,
        "finite",
        "finite",
    )
    # Losses.
    add(
        "row with nothing included (where all False)",
        empty,
        LOSSES,
        (_LOGITS, _Y3),
        {"where": _EMPTY_MASK, "label_smoothing": 0.1, "z_loss": 0.1},
        1,
        "0",
        "0",
    )
    add(
        "row of all -inf logits",
        empty_inf,
        LOSSES,
        (_NEGINF_ROW, _Y3),
        {"label_smoothing": 0.1, "z_loss": 0.1},
        1,
        "0",
        "0",
    )
    add("NaN logit", nan_row, LOSSES, (_NAN_ROW, _Y3), {}, 1, "nan", "nan", (_LOGITS, _Y3))
    add(
        "+inf logit",
        nan_row + " (as jax.nn)",
        LOSSES,
        (_POSINF_ROW, _Y3),
        {},
        1,
        "nan",
        "nan",
        (_LOGITS, _Y3),
    )
    soft = [[0.2, 0.3, 0.5], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]
    add(
        "NaN in float labels",
        nan_row,
        LOSSES,
        (_LOGITS, _rows(soft[0], [0.5, NAN, 0.5], soft[2])),
        {},
        1,
        "nan",
        "nan",
        (_LOGITS, _rows(*soft)),
    )
    bad = (
        "NaN loss and gradient in that example only, eagerly and under jit (jsm.check_labels "
        "raises instead)"
    )
    for y in ([0, 3, 2], [0, -1, 2]):
        add(
            "integer label outside [0, C)",
            bad,
            LOSSES,
            (_LOGITS, _frozen(np.int32(y))),
            {},
            1,
            "nan",
            "nan",
            (_LOGITS, _Y3),
        )
    bad_excluded = "NaN loss and gradient in that example only, eagerly and under jit"
    add(
        "integer label on a class excluded by where",
        bad_excluded,
        LOSSES,
        (_LOGITS, _Y3),
        {"where": _frozen(np.array([[True] * 3, [True, False, True], [True] * 3]))},
        1,
        "nan",
        "nan",
        (_LOGITS, _frozen(np.int32([0, 0, 2]))),
    )
    ignored = "loss 0 and gradient 0; left out of the mean"
    add(
        "label equal to ignore_index",
        ignored,
        LOSSES,
        (_LOGITS, _frozen(np.int32([0, -100, 2]))),
        {"ignore_index": -100},
        1,
        "0",
        "0",
    )
    all_ignored = "0 with gradient 0 (not 0/0)"
    add(
        'every example ignored, reduction="mean"',
        all_ignored,
        LOSSES,
        (_LOGITS, _frozen(np.full(3, -100, np.int32))),
        {"ignore_index": -100, "reduction": "mean"},
        None,
        "0",
        "0",
    )
    plus_inf = "+inf loss for that example"
    add(
        "positive target weight on an included -inf logit",
        plus_inf,
        LOSSES,
        (_rows(_FINITE[0], [-INF, 0.0, 1.0], _FINITE[2]), _frozen(np.zeros(3, np.int32))),
        {},
        1,
        "+inf",
        None,
    )
    zero_log_zero = "0·log 0 = 0: that class adds nothing; finite loss and gradient"
    add(
        "-inf logit with target weight 0",
        zero_log_zero,
        LOSSES,
        (
            _rows(_FINITE[0], [-INF, 0.0, 1.0], _FINITE[2]),
            _rows([0.2, 0.3, 0.5], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]),
        ),
        {},
        1,
        "finite",
        "finite",
    )
    add(
        "huge or tiny finite logits (±1e30, ±3e5, ±1e-30)",
        huge,
        LOSSES,
        (_HUGE, _Y3),
        {"label_smoothing": 0.1},
        0,
        "finite",
        "finite",
    )
    # optax's names.
    sce, sce_int = OPTAX_LOSSES
    soft_rows = _rows(*soft)
    per_example = _frozen(np.array([True, False, True]))
    add(
        "row with nothing included (per-example where False)",
        empty,
        (sce,),
        (_LOGITS, soft_rows),
        {"where": per_example},
        1,
        "0",
        "0",
    )
    add(
        "row with nothing included (per-example where False)",
        empty,
        (sce_int,),
        (_LOGITS, _Y3),
        {"where": per_example},
        1,
        "0",
        "0",
    )
    add(
        "NaN logit",
        nan_row,
        (sce,),
        (_NAN_ROW, soft_rows),
        {},
        1,
        "nan",
        "nan",
        (_LOGITS, soft_rows),
    )
    add("NaN logit", nan_row, (sce_int,), (_NAN_ROW, _Y3), {}, 1, "nan", "nan", (_LOGITS, _Y3))
    add(
        "+inf logit",
        nan_row + " (as jax.nn)",
        (sce_int,),
        (_POSINF_ROW, _Y3),
        {},
        1,
        "nan",
        "nan",
        (_LOGITS, _Y3),
    )
    for y in ([0, 3, 2], [0, -1, 2]):
        add(
            "integer label outside [0, C)",
            bad,
            (sce_int,),
            (_LOGITS, _frozen(np.int32(y))),
            {},
            1,
            "nan",
            "nan",
            (_LOGITS, _Y3),
        )
    add(
        "-inf logit with target weight 0",
        zero_log_zero,
        (sce,),
        (
            _rows(_FINITE[0], [-INF, 0.0, 1.0], _FINITE[2]),
            _rows([0.2, 0.3, 0.5], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]),
        ),
        {},
        1,
        "finite",
        "finite",
    )
    # The linear head.
    add(
        "integer label outside [0, C)",
        bad,
        (LINEAR,),
        (H, W, _frozen(np.int32([0, 5, 2, 4]))),
        {"reduction": "none"},
        1,
        "nan",
        "nan",
        (H, W, Y_LIN),
    )
    add(
        "label equal to ignore_index",
        ignored,
        (LINEAR,),
        (H, W, _frozen(np.int32([0, -100, 2, 4]))),
        {"reduction": "none", "ignore_index": -100},
        1,
        "0",
        "0",
    )
    add(
        'every example ignored, reduction="mean"',
        all_ignored,
        (LINEAR,),
        (H, W, _frozen(np.full(4, -100, np.int32))),
        {"ignore_index": -100},
        None,
        "0",
        "0",
    )
    add(
        "NaN logit",
        nan_row,
        (LINEAR,),
        (_XL_NAN, W, Y_LIN),
        {"reduction": "none"},
        1,
        "nan",
        "nan",
        (H, W, Y_LIN),
    )
    add(
        "positive target weight on an included -inf logit",
        plus_inf,
        (LINEAR,),
        (H, W, Y_LIN),
        {"reduction": "none", "bias": _frozen(np.float32([0, -INF, 0, 0, 0]))},
        1,
        "+inf",
        None,
    )
    return rows


EDGE_VALUES: tuple[EdgeValue, ...] = tuple(_edge_values())

# check_labels on values: a bad label is an error (eagerly) or a checkify error (under jit).
CHECK_LABELS_RESULT = (
    "integer label outside [0, C), given to jsm.check_labels",
    "error: `labels: 1 label(s) outside [0, 3); first bad label 5 at flat index 1` "
    "(eagerly raised; under jit through checkify)",
)
CHECK_LABELS_CASE = (_frozen(np.int32([0, 5, 2])), 3)
