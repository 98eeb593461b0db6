"""Helpers shared by the experiment scripts: results folder, atomic writes, data, plots, timing.

Every file is written atomically: the bytes go to a temporary file in the destination's own
directory, which is flushed and then renamed over the destination with ``os.replace``. A run
that is interrupted therefore leaves either the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_dir(out: str | os.PathLike[str] | None) -> Path:
    """Returns the folder for results (``experiments/results`` by default), creating it."""
    path = Path(out) if out is not None else RESULTS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(fileobj)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _jsonable(obj: Any) -> Any:
    """Converts NumPy/JAX values to JSON types; non-finite floats become the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` so the file stays standard JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        x = float(obj)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Writes ``data`` as indented, standard JSON (atomically)."""
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Saves named arrays to an ``.npz`` file (atomically)."""
    host = {k: np.asarray(v) for k, v in arrays.items()}
    return atomic_write(path, lambda f: np.savez(f, **host))


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Loads an ``.npz`` file written by :func:`save_npz`; pickled objects are refused."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Saves a Matplotlib figure as PNG (atomically) and closes it."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def pyplot():
    """Returns ``matplotlib.pyplot`` on the file-only Agg backend with a readable style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.constrained_layout.use": True,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "font.size": 10,
        }
    )
    return plt


def digits_split(
    split_seed: int = 0, test_fraction: float = 0.25
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (bundled, no download), split and standardized.

    The split is stratified: each class gives ``round(test_fraction · count)`` of its examples,
    chosen by ``split_seed``, to the test part. Features are standardized with the mean and
    standard deviation of the training part; pixels that are constant there keep a scale of 1.

    Returns:
      ``x_train [N_train, 64] float32, y_train [N_train] int32, x_test, y_test``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(split_seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: round(test_fraction * len(members))]] = True
    x_train, y_train, x_test, y_test = x[~test], y[~test], x[test], y[test]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    ``fn`` must block until its result is ready (for JAX, end it with ``block_until_ready``).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
