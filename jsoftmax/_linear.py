r"""Linear head + cross-entropy without materializing the ``[tokens, vocab]`` logits.

A language model's last layer projects hidden states ``x: [N, D]`` onto a vocabulary
``w: [D, V]`` and feeds the logits to a softmax cross-entropy. Written naively, the logits and
their gradient are two ``[N, V]`` float32 arrays, which for ``N = 8192`` tokens and
``V = 32768`` words is 2 GiB of temporaries for a result that is one number.
:func:`linear_cross_entropy` computes the same value and the same gradients with respect to
``x``, ``w`` and ``bias`` while holding one bounded block of logits at a time.

Design
------
The rows of ``x`` are cut into chunks of ``R`` rows and the vocabulary into tiles of ``T``
columns. Nothing is padded: when ``R`` does not divide N (or ``T`` does not divide V) the last
chunk (tile) is moved back to end at the edge, and the rows (columns) it repeats are left out
of every sum (``_start``). Two schedules share the per-block math:

* **one-pass** (``"sum"`` and ``"mean"``, when a chunk's whole rows fit: ``R·V <= 2**23``,
  32 MiB of float32, i.e. ``V <= 65536`` at 128 rows). The cotangent of the loss is one scalar
  ``g``, so the gradients are formed *in the forward pass* and the backward pass only scales
  them by ``g``. Per chunk: one matmul forms the whole rows ``u = x_c @ w + b`` ``[R, V]``; a walk
  over its tiles takes the row statistics; ``dz`` is formed over the whole block in its place;
  ``dx_c = dz @ wᵀ`` is one matmul; and a walk over tiles adds ``x_cᵀ @ dz_t`` into ``dw`` (and
  ``dz_t``'s column sums into ``dbias``) in place. Three matmuls, as the naive head, and no
  ``[D, V]`` array besides ``dw`` itself: the accumulator becomes the gradient. Called without a
  gradient, JAX runs the plain forward pass (one matmul per tile, as below).
* **two-pass** (``"none"``, whose per-row cotangents only the backward pass knows, and
  vocabularies too wide for a block). The forward pass walks tiles ``u_t = x_c @ w_t + b_t``
  ``[R, T]`` and keeps per-row statistics, combined across tiles by an online logsumexp
  (Milakov & Gimelshein), and saves four numbers a row (five with label smoothing). The
  backward pass recomputes each tile's logits and adds ``dz_t @ w_tᵀ`` to the chunk's ``dx`` and
  ``x_cᵀ @ dz_t`` to ``dw`` in place: four matmuls, and a logit block that does not grow with V.

**The rule between them** is the block: one-pass when ``R`` rows of the whole vocabulary fit
``2**23`` elements, two-pass otherwise (and always for ``"none"``). Measured on a 2-core CPU
(``experiments/bench_linear.py --compare-schedules``, jax 0.12): the one-pass ran 1.12-1.13x
faster than the two-pass in CPU time (1.08-1.12x wall) at (N, D, V) = (2048, 256, 32768) and
(1024, 512, 50257): three matmuls instead of four, for one ``[R, V]`` block (16 MiB at 128 rows
and V = 32768) where the two-pass holds ``[R, T]`` tiles (2 MiB). The price is memory: between
V = 16384 and 65536 (at D = 256, N = 4096) the block puts the peak up to 16 MiB above tokamax's
chunked head, which holds two ``[1024, 2048]`` tiles; ``reduction="none"`` or a smaller
``chunk_size`` takes the tiles instead.

Measured (``experiments/bench_linear.py``, jax 0.12.1, tokamax 0.0.17, 2-core CPU shared with
other jobs; peak = temporaries + outputs of ``value_and_grad`` wrt ``(x, w)``, float32):

* (8192, 512, 32768): naive 2128.1 MiB, tokamax 98.1, this head 97.6 (one-pass; the outputs
  dx, dw and the loss are 80.0, so 17.6 MiB of temporaries);
* (8192, 512, 50257): naive 3255.3, tokamax 324.2, this head 140.3 (one-pass);
* (4096, 256, 262144): naive 8452.0, tokamax 277.0, this head 262.8 (two-pass).

Time, float32, wall (CPU) speedups of this head over naive and over tokamax (medians of 21
interleaved rounds; other runs differ by a few percent): (2048, 256, 32768) 1.01x (1.04x) and
1.10x (1.11x); (1024, 512, 50257) 0.89x (0.94x) and 1.11x (1.14x). The naive head is not
beaten at D = 512: there the memory bound holds a chunk to 128 rows, each chunk streams all of
``w`` twice and ``dw`` once, and the three products of 128-row chunks alone (no softmax) took
0.96-0.99 s against the whole naive head's 1.00 s.

Numerics
--------
Per row, with ``r`` the row max, ``d_y = z_y - r`` the label's shifted logit and

.. math::

   q = \sum_{j \ne y} e^{z_j - r}, \qquad S = e^{d_y} + q, \qquad T = S - 1 = (e^{d_y} - 1) + q,

the loss is :math:`\ell = \operatorname{log1p}(T) - d_y` (plus the smoothing and z-loss terms,
each non-negative), and :math:`\partial\ell/\partial z_j = e^{z_j - r}/S` for :math:`j \ne y`,
:math:`\partial\ell/\partial z_y = -q/S`.

* The label's own term is left out of ``q``: for a confident row (the label at the max)
  ``T = q`` exactly, so ``log1p(T)`` keeps every digit of a loss of 1e-30, and the label's
  gradient ``-q/S`` never forms ``1 - (almost 1)``. No tie count is needed: other entries at the
  max simply add 1 each to ``q``.
* Sums are pairwise (``_pairwise``): a row is cut into pieces 128 times a power of two wide, each
  folded in halves down to 128 columns by elementwise adds, then summed. The rounding error of
  one long chain over 1022 equal tiny terms next to a larger one (``[0, -18, -30 x 1022]``) can
  reach 490 ulp; folded, the flat-tail rows of ``experiments/accuracy.py`` are within 12 ulp.
  The folds are also what XLA:CPU runs fast (a plain row reduction of jax 0.12 costs 5 ns an
  entry), and XLA cannot merge them back into one reduction as it does a reshape and two sums.
* Across tiles (and vocabulary shards) the statistics are combined against the larger max:
  ``q = q_a·e^{m_a - m} + q_b·e^{m_b - m}``, where one factor is exactly 1.
* The backward pass uses ``e^{z - r}/S`` with ``r`` an actual logit, never ``e^{z - lse}``: at
  logits around 1e4, ``lse`` is rounded to 1e-3 and ``e^{z - lse}`` would be 1e-3 off.
* Rows whose logits are all ``-inf`` give loss 0 and gradient 0; a label outside ``[0, V)`` that
  is not ``ignore_index`` gives NaN in its row (and NaN in ``dw``/``dbias``, as for the
  materialized logits); NaN in one row never reaches another row's loss or ``dx``.

Measured with ``experiments/accuracy.py`` (``x`` = identity rows, so ``x @ w`` is exact): the
loss and both schedules' gradients stay within the fused loss's bounds (64 and 128 ulp) on every
family of the campaign the fused loss meets, flat tails included; see the accuracy table.

Chunk and tile rules
--------------------
``chunk_size=None`` (:func:`default_chunk_size`): when 128 whole rows fit the one-pass block
(``V <= 65536``), 256 rows if the chunk of ``x`` then holds at most ``2**16`` entries (``R·D``,
256 KiB: ``x_c`` and ``dx_c`` stay in a core's cache while ``w`` streams past them) and the
block at most ``2**23`` (``R·V``), else 128: 256 rows at D <= 256, 128 at D=512. Each chunk
reads and writes all of ``dw`` once, so fewer chunks pay (at D=256, V=32768, 256 rows ran 6-8%
faster than 128); more than 256 rows did not pay for their block (at D=128, V=16384, 512 rows
doubled the temporaries of ``experiments/train_lm.py``'s step). Otherwise (wider vocabularies)
256 rows of tiles. When N is not a multiple, chunks are balanced (``ceil(N / ceil(N / R))``,
rounded up to a multiple of 8), so the last one repeats few rows.

A vocabulary tile is at most 2048 columns, and narrower where one of its temporaries would
hold more than ``2**18`` elements (1 MiB of float32): a walk that slices ``w`` or adds into
``dw`` holds ``[D, T]`` and ``[R, T]`` arrays (``T <= 2**18 / max(D, R)``), while the one-pass
walk that takes the statistics reads its stored block alone (``[R, T]``: ``T <= 2**18 / R``).
Tiles are never under 128 columns and are balanced the same way (multiples of 128). Fewer,
wider tiles pay: each step of a walk is a few small operations, and each tile of ``dw`` is one
product of ``R`` rows. Measured against narrower tiles (at most 512 columns and ``2**17``
elements, the same for both one-pass walks), these ran 1.03x faster (wall; 1.03x CPU) at
(2048, 256, 32768), 1.04x (0.99x) at (1024, 512, 50257), and 1.04x for ``reduction="none"`` (the
two-pass) at (2048, 256, 32768), medians of 21 and 11 interleaved rounds. Measured peak temporaries
of a float32 ``value_and_grad`` (N=8192, D=512, V=32768): 17.6 MiB, of which 16 MiB is the
128-row block; (N=4096, D=256, V=262144, two-pass): 2.8 MiB. ``chunk_size`` sets ``R`` (rows
per chunk) in both schedules; the schedule then follows from ``R·V``.

Vocabulary shards
-----------------
With ``axis_name`` (inside :func:`jax.shard_map`, ``w`` and ``bias`` split along V), each shard
walks its own columns and the statistics are combined once per chunk in :func:`_across_shards`:
a ``pmax`` of the row max and one ``psum`` of ``q`` (rescaled to the global max), the label's
logit (read on the shard that owns it, 0 elsewhere) and the smoothing sums: ``O(R)`` numbers per
chunk, never the vocabulary. Smoothing and z-loss use the global class count and logsumexp.
Each shard forms ``dw`` and ``dbias`` for its own columns and a partial ``dx``, which is summed
over ``axis_name`` (by a ``psum`` here under ``check_vma=True``, by shard_map's own transpose
with ``check_vma=False``). Under ``jax.jit`` with explicit mesh axes,
:func:`jsoftmax._sharding.linear_over_mesh` runs the same code inside a ``shard_map``. Under
``AxisType.Auto`` the split is invisible while tracing, and XLA's partitioner decides it: a walk
over tiles slices the vocabulary at a traced offset, and a pairwise fold slices it in halves,
and for either the partitioner would move the logits between devices (measured: ``[32, 4096]``
all-gathers at V=4096 on a 2x2 mesh, and collective-permutes of half of each block). So when
``x``, ``w`` or ``bias`` lives on a mesh with an ``Auto`` axis of more than one device, the head
takes the vocabulary as one tile and sums it with plain reductions (chunks sized so that a
``[R, V]`` block stays within ``2**23`` elements); the partitioner then splits every operation
along the vocabulary and all-reduces per-row numbers, and the backward pass the partial ``dx``
(``tests/test_sharding.py`` checks that no collective carries the vocabulary).

Platforms
---------
The head is one formulation, the plain statement of the math above, for every backend: the
pairwise folds are as fast on XLA:CPU as any CPU-specific spelling tried (a multi-operand
``lax.reduce``, a whole-block reduction), so there is no CPU branch and no
``optimization_barrier``; the programs exported for ``cuda`` and ``tpu`` are the CPU's.

dtype
-----
16-bit ``x`` and ``w`` stay 16-bit in the matmuls, which accumulate in float32
(``preferred_element_type``). The statistics, the loss and the ``dx``/``dw``/``dbias``
accumulators are float32 (a float32 ``dw`` of ``4·D·V`` bytes beside the 16-bit gradient:
tokamax keeps one too); ``dz`` is rounded to the inputs' dtype for the two gradient matmuls
(what autodiff of 16-bit logits does), and each gradient comes back in its input's dtype.

References: Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018); Wijmans
et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024); Hsu et al., "Liger
Kernel" (2024).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _numerics as nm
from . import _sharding as sh
from . import _validation as val

Array = jax.Array

_REDUCTIONS = ("none", "sum", "mean")
# The one-pass schedule holds a chunk's whole rows of logits, [rows, V]: at most this many
# elements (32 MiB of float32). Wider vocabularies take the two-pass schedule's tiles.
_ONE_PASS_ELEMENTS = 1 << 23
_ROWS = 128  # default rows per chunk when a chunk's whole rows fit (the one-pass schedule) ...
_MAX_ROWS = 256  # ... or up to this many while the chunk of x holds at most _CHUNK_ELEMENTS
_CHUNK_ELEMENTS = 1 << 16  # (256 KiB of float32: x_c and dx_c stay in a core's cache)
_TILED_ROWS = 256  # default rows per chunk otherwise
_TILE = 2048  # vocabulary columns per tile (at most)
# A tile's temporaries ([D, T]: the slice of w, the update of dw; [R, T]: logits, dz) hold at
# most this many elements each (1 MiB of float32), however large D or R (tiles stay >= 128).
_TILE_ELEMENTS = 1 << 18
_SUM_BLOCK = 128  # pairwise sums fold pieces down to this many columns (see _pairwise)


class _Plan(NamedTuple):
    """How the work is cut (static): ``rows`` per chunk, ``tile`` columns per vocabulary tile."""

    rows: int
    tile: int  # two-pass: every walk; one-pass: the walk that adds x_cᵀ @ dz_t into dw
    stats_tile: int  # one-pass: columns per tile of the walk that takes the statistics
    one_pass: bool  # gradients formed in the forward pass from a stored [rows, V] block
    plain_sums: bool = False  # whole-row reductions, for XLA's partitioner (see _plan)


class _Options(NamedTuple):
    """Static configuration of the kernel (hashable, for ``nondiff_argnums``)."""

    label_smoothing: float
    z_loss: float
    softcap: float | None
    axis_name: object
    sum_rows: bool  # True: return the weighted sum of the rows ("sum"/"mean"); False: the rows.
    plan: _Plan


class _Stats(NamedTuple):
    """Running statistics of the rows of a chunk over the vocabulary seen so far, shape [R].

    With ``r = finite(m)`` (the max, or 0 while it is ``-inf``): ``q = sum_{j != y} e^{z_j - r}``
    (the label's own term left out), ``zy`` the label's logit (0 until its tile is seen), and
    for label smoothing ``sd = sum_{finite z} (z - r)`` and ``k`` the number of finite logits.
    """

    m: Array
    q: Array
    zy: Array
    sd: Array | None
    k: Array | None


class _Terms(NamedTuple):
    """What the gradient of a row needs, per row [R] (the one-pass uses them at once, the
    two-pass saves them for the backward pass)."""

    ref: Array  # the shift r: the row max, 0 for a row of -inf logits
    scale: Array  # (1 + 2c·lse) / S: the factor of e^{z - r} in d loss / dz
    label: Array  # d loss / d z_y for a row weight of 1
    smooth: Array | None  # eps / K: subtracted on every finite logit (label smoothing)
    weight: Array  # the row's weight where it contributes, else 0 (NaN for a bad label)


def _balanced(total: int, most: int, multiple: int) -> int:
    """``ceil(total / ceil(total / most))`` rounded up to ``multiple``, at most ``most``: as few
    blocks as ``most`` allows, sized so that the last one wastes little."""
    if total <= most:
        return total
    count = -(-total // most)
    size = -(-total // count)
    return min(-(-size // multiple) * multiple, most)


def default_chunk_size(num_tokens: int, vocab: int, dim: int) -> int:
    """The rows per chunk that ``chunk_size=None`` uses (the rule in the module docstring).

    When 128 whole rows of logits fit the one-pass block (``128·V <= 2**23``): 256 rows if the
    chunk of ``x`` then holds at most ``2**16`` elements (``R·D``) and the block at most
    ``2**23`` (``R·V``), else 128. Otherwise 256 rows (of tiles).
    Then balanced: ``ceil(N / ceil(N / R))`` rounded up to a multiple of 8.

    Args:
      num_tokens: N, the number of rows of ``x`` after flattening the batch dimensions.
      vocab: V, the number of classes in ``w`` (the local shard's when sharded).
      dim: D, the hidden size.

    Returns:
      A positive int, at most ``max(num_tokens, 1)``.

    Examples:
      >>> default_chunk_size(8192, 32768, 512)
      128
      >>> default_chunk_size(2048, 32768, 256)
      256
      >>> default_chunk_size(300, 32768, 512)  # three balanced chunks, not 128 + 128 + 44
      104
      >>> default_chunk_size(8192, 262144, 256)
      256
      >>> default_chunk_size(10, 32768, 512)
      10
    """
    most = _TILED_ROWS
    if _ROWS * vocab <= _ONE_PASS_ELEMENTS:
        most = _ROWS
        while (
            most < _MAX_ROWS
            and 2 * most * dim <= _CHUNK_ELEMENTS
            and 2 * most * vocab <= _ONE_PASS_ELEMENTS
        ):
            most *= 2
    return max(_balanced(max(num_tokens, 1), most, 8), 1)


def _plan(
    num_tokens: int,
    dim: int,
    vocab: int,
    chunk_size: int | None,
    sum_rows: bool,
    whole_rows: bool = False,
) -> _Plan:
    """The schedule and the cuts for one call (see "Schedules" in the module docstring).

    ``whole_rows``: the inputs live on a mesh with ``Auto`` axes (``_sharding.on_auto_mesh``),
    whose split XLA's partitioner decides. The vocabulary is then one tile, summed by plain
    reductions, so that the partitioner can split every operation along the vocabulary and
    combine per-row numbers: a walk over tiles (a slice at a traced offset) or a pairwise fold
    (slices of halves) along a split axis would make it move the logits between devices.
    Chunks are sized so that one ``[rows, V]`` block stays within ``2**23`` elements.
    """
    if chunk_size is None:
        rows = default_chunk_size(num_tokens, vocab, dim)
        if whole_rows:
            rows = min(rows, max(_ONE_PASS_ELEMENTS // max(vocab, 1) // 8 * 8, 8))
    else:
        rows = max(min(chunk_size, num_tokens), 1)
    if whole_rows:
        return _Plan(rows=rows, tile=vocab, one_pass=sum_rows, plain_sums=True, stats_tile=vocab)
    one_pass = sum_rows and rows * vocab <= _ONE_PASS_ELEMENTS

    def width(extent):  # columns of a tile whose temporaries are [extent, T]
        most = (_TILE_ELEMENTS // max(extent, 1)) // _SUM_BLOCK * _SUM_BLOCK
        return _balanced(vocab, max(min(_TILE, most), _SUM_BLOCK), _SUM_BLOCK)

    # Tiles of w and dw are [D, T], of logits and dz [R, T]; the one-pass statistics read the
    # stored block alone, so only R bounds their tiles.
    tile = width(max(dim, rows))
    return _Plan(
        rows=rows, tile=tile, one_pass=one_pass, stats_tile=width(rows) if one_pass else tile
    )


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    chunk_size: int | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    axis_name: Hashable | None = None,
) -> Array:
    r"""Cross-entropy of the linear head ``x @ w + bias``, one block of logits at a time.

    The value and the gradients with respect to ``x``, ``w`` and ``bias`` are those of
    ``fused_cross_entropy(logits, labels, ...)`` with the logits below, but the ``[N, V]``
    logits are never materialized: peak temporary memory is set by the chunk (``chunk_size``
    rows) and the vocabulary tile, not by the number of tokens. See the module docstring for
    the two schedules, the numerics and the chunk-size rule.

    .. math::

       z = c \tanh\big((x w + b) / c\big), \qquad
       \ell_i = (1 - \varepsilon)\big(\operatorname{lse}(z_i) - z_{i y_i}\big)
         + \varepsilon \big(\operatorname{lse}(z_i) - \tfrac{1}{V}\textstyle\sum_j z_{ij}\big)
         + \lambda \operatorname{lse}(z_i)^2

    with ``c`` the ``softcap`` (no cap when None), ``ε`` the ``label_smoothing`` and ``λ`` the
    ``z_loss`` coefficient. With ``-inf`` logits (e.g. a ``-inf`` bias on padded vocabulary
    entries) the smoothing mass goes to the finite logits only, as in
    ``fused_cross_entropy``.

    Args:
      x: hidden states, shape ``[..., D]``, floating.
      w: projection, shape ``[D, V]`` (pass ``table.T`` for a tied ``[V, D]`` embedding). Under
        ``axis_name``, the local shard ``[D, V / num_shards]``.
      labels: integer class ids, shape ``x.shape[:-1]``, global ids under ``axis_name``.
      bias: optional, shape ``[V]`` (the local shard under ``axis_name``).
      chunk_size: rows of ``x`` per chunk; None picks one from N and V. Need not divide N.
      ignore_index: examples whose label equals it get loss 0 and gradient 0 and are left out
        of the ``"mean"``.
      label_smoothing: ε in [0, 1); the target is ``(1 − ε)·onehot + ε/V``.
      z_loss: λ ≥ 0; adds ``λ · lse²`` per example (PaLM).
      softcap: None or c > 0; the logits become ``c · tanh(logits / c)`` (Gemma 2).
      reduction: ``"mean"`` (over non-ignored examples; 0 when all are ignored), ``"sum"`` or
        ``"none"``.
      axis_name: inside :func:`jax.shard_map`, the mesh axis along which ``w`` (and ``bias``)
        are split by vocabulary, in order. The result equals the unsharded call.

    Returns:
      float32 (float64 for float64 inputs) loss: a scalar, or shape ``x.shape[:-1]`` for
      ``reduction="none"``. A label outside ``[0, V)`` that is not ``ignore_index`` gives NaN
      for its example (and NaN in its contributions to the gradients).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> w = jnp.array([[1.0, -1.0, 0.5], [0.0, 1.0, -0.5]])
      >>> labels = jnp.array([0, 1, 2])
      >>> loss = linear_cross_entropy(x, w, labels, chunk_size=2)
      >>> print(round(float(loss), 4))
      0.7587
      >>> ref = jnp.mean(jax.nn.logsumexp(x @ w, axis=-1) - (x @ w)[jnp.arange(3), labels])
      >>> print(round(float(ref), 4))
      0.7587
      >>> dx, dw = jax.grad(linear_cross_entropy, argnums=(0, 1))(x, w, labels)
      >>> dx.shape, dw.shape
      ((3, 2), (2, 3))

    References:
      Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (Cut
      Cross-Entropy), 2024, https://arxiv.org/abs/2411.09009.
      Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024,
      https://arxiv.org/abs/2410.10989.
      Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018,
      https://arxiv.org/abs/1805.02867.
      Chowdhery et al., "PaLM" (z-loss), 2022, https://arxiv.org/abs/2204.02311.
    """
    x, w, labels, bias, label_smoothing, z_loss, softcap = _validate(
        x,
        w,
        labels,
        bias,
        chunk_size,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        axis_name,
    )
    if axis_name is None and sh.linear_is_explicitly_sharded(x, w):
        return sh.linear_over_mesh(
            linear_cross_entropy,
            x,
            w,
            labels,
            bias=bias,
            reduction=reduction,
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
        )
    batch_shape = x.shape[:-1]
    dim, vocab = w.shape
    n = math.prod(batch_shape)
    acc = _accumulation_dtype(x.dtype, w.dtype)

    if axis_name is None:
        num_classes, offset = vocab, 0
    else:
        num_classes = vocab * lax.axis_size(axis_name)
        offset = lax.axis_index(axis_name) * vocab

    sum_rows = reduction != "none"
    if n == 0:  # no rows: nothing to cut into chunks; the loss and its gradients are 0
        return jnp.zeros((() if sum_rows else batch_shape), acc)
    y = labels.reshape(n)
    ignored = (y == ignore_index) if ignore_index is not None else jnp.zeros(n, dtype=bool)
    invalid = ~ignored & ((y < 0) | (y >= num_classes))
    # Row weights: 0 drops a row (ignored), NaN marks a bad label of that row only.
    weights = jnp.where(ignored, 0.0, jnp.where(invalid, jnp.nan, 1.0)).astype(acc)
    if reduction == "mean":
        weights = weights / jnp.maximum(jnp.sum(~ignored), 1).astype(acc)

    opts = _Options(
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=None if softcap is None else float(softcap),
        axis_name=axis_name,
        sum_rows=sum_rows,
        plan=_plan(n, dim, vocab, chunk_size, sum_rows, sh.on_auto_mesh(x, w, bias)),
    )
    y_local = (y - offset).astype(jnp.int32)
    out = _head(opts, x.reshape(n, dim), w, bias, y_local, weights)
    return out if sum_rows else out.reshape(batch_shape)


# ---------------------------------------------------------------------------------------------
# Validation.


def _validate(
    x,
    w,
    labels,
    bias,
    chunk_size,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    axis_name,
):
    x = jnp.asarray(x)
    w = jnp.asarray(w)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: must be a floating array, got dtype {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x: must have shape [..., D], got a scalar")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w: must be a floating array, got dtype {w.dtype}")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w: shape {w.shape} does not fit x of shape {x.shape}; expected "
            f"[{x.shape[-1]}, V] (pass table.T for a [V, D] embedding table)"
        )
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias: must be a floating array, got dtype {bias.dtype}")
        if bias.shape != (w.shape[1],):
            raise ValueError(
                f"bias: shape {bias.shape} does not fit w of shape {w.shape}; "
                f"expected ({w.shape[1]},)"
            )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels: must be integer class ids, got dtype {labels.dtype} "
            "(linear_cross_entropy takes integer labels only)"
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels: shape {labels.shape} does not match x.shape[:-1] = {x.shape[:-1]}"
        )
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size: must be positive, got {chunk_size}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index: must be an int or None, got {ignore_index!r}")
    val.ignore_index_fits(ignore_index, labels.dtype)
    label_smoothing = val.static_float(label_smoothing, "label_smoothing", 0.0, 1.0)
    z_loss = val.static_float(z_loss, "z_loss", 0.0)
    if softcap is not None:
        try:
            cap = val.static_float(softcap, "softcap", 0.0)
        except ValueError:
            cap = 0.0
        if cap <= 0.0:
            raise ValueError(f"softcap: must be None or finite and > 0, got {float(softcap)}")
        softcap = cap
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: must be one of {_REDUCTIONS}, got {reduction!r}")
    if axis_name is not None:
        try:
            lax.axis_size(axis_name)
        except NameError as e:
            raise ValueError(
                f"axis_name: {axis_name!r} is not a bound mesh axis; call linear_cross_entropy "
                "inside jax.shard_map over that axis, with w split along V"
            ) from e
    # At least 32 bits, so that comparing labels with V (or a shard offset) cannot wrap.
    return x, w, val.integer_labels(labels), bias, label_smoothing, z_loss, softcap


def _accumulation_dtype(*dtypes):
    return nm.compute_dtype(jnp.result_type(*dtypes))


# ---------------------------------------------------------------------------------------------
# The math of one block of logits. A block is `v` [R, T] in the accumulation dtype: the logits
# z = v without a softcap, v = tanh(u / c) and z = c·v with one (v is kept for the cap's
# derivative). Per-row quantities have shape [R].


def _logits(xc, wt, bt, opts: _Options):
    """``v`` for rows ``xc`` [R, D] and columns ``wt`` [D, T] (``bt`` [T] or None)."""
    return _finish(_product(xc, wt), bt, opts)


def _product(xc, wt):
    """``xc @ wt``, accumulated in float32 (or wider)."""
    acc = _accumulation_dtype(xc.dtype, wt.dtype)
    cdt = jnp.result_type(xc.dtype, wt.dtype)
    return jnp.dot(xc.astype(cdt), wt.astype(cdt), preferred_element_type=acc)


def _finish(u, bt, opts: _Options):
    """``v`` from the product ``u``: the bias added, then the cap (elementwise, so fused into
    whatever reads ``v``: the one-pass keeps ``u`` in its block, one array however it is used)."""
    if bt is not None:
        u = u + bt.astype(u.dtype)[None, :]
    return u if opts.softcap is None else jnp.tanh(u / opts.softcap)


def _capped(v, opts: _Options):
    return v if opts.softcap is None else opts.softcap * v


def _finite(m):
    """The shift of a row: its max, or 0 while the max is ``-inf`` (so ``z - 0`` stays -inf)."""
    return jnp.where(m == -jnp.inf, jnp.zeros((), m.dtype), m)


def _pairwise(entries, width: int, op, reduce):
    """The reduction of ``width`` columns with ``op``, pairwise; ``entries(start, size)`` gives
    the values of columns ``[start, start + size)`` (``[..., size]``), computed where needed.

    The columns are cut into pieces 128 times a power of two wide (widest first; a tail under
    128 stays as it is); each piece is folded in halves (``op`` of its two halves, elementwise)
    down to 128 columns, the pieces are combined, and ``reduce`` finishes the 128 columns.

    Why not one ``jnp.sum``/``jnp.max``: a sum's rounding error grows with its longest chain of
    additions, and one chain over thousands of classes loses up to ~3e-5 of a small total next
    to a large term (a confident row with a long flat tail, ``[0, -18, -30 x 1022]``: 490 ulp at
    worst); pairwise, every chain is short. A reshape and two sums would not do: XLA merges those
    back into one reduction. Elementwise folds are fused and vectorized everywhere, while some
    compilers run a long row reduction slowly (XLA:CPU in jax 0.12 takes 5 ns an entry for a
    row max over [128, 32768], against 0.3 ns for the folds). Power-of-two pieces keep every
    fold even (an odd one would need a concatenation), and each piece computes its own entries:
    XLA materializes an ``exp`` that several reductions read, a [rows, V] temporary.
    """
    folded, start = None, 0
    while width - start >= _SUM_BLOCK:
        size = _SUM_BLOCK << (((width - start) // _SUM_BLOCK).bit_length() - 1)
        piece = entries(start, size)
        while piece.shape[-1] > _SUM_BLOCK:
            half = piece.shape[-1] // 2
            piece = op(piece[..., :half], piece[..., half:])
        folded = piece if folded is None else op(folded, piece)
        start += size
    if start == width:
        return reduce(folded)
    tail = reduce(entries(start, width - start))
    return tail if folded is None else op(reduce(folded), tail)


def _row_sum(a, axis: int = -1):
    """Sum over ``axis``, pairwise (see ``_pairwise``)."""
    a = jnp.moveaxis(a, axis, -1)
    return _pairwise(
        lambda start, size: a[..., start : start + size],
        a.shape[-1],
        jnp.add,
        lambda b: jnp.sum(b, -1),
    )


def _tile_stats(v, loc, lo, opts: _Options) -> _Stats:
    """The statistics of one tile, relative to its own max.

    ``loc`` [R]: the label's column in this tile (anything outside ``[0, T)`` when it is
    elsewhere). ``lo``: None, or the number of leading columns that belong to the previous tile
    (the last tile of a ragged vocabulary is moved back to end at V): they are left out.
    """
    width = v.shape[-1]
    first = 0 if lo is None else lo

    def z_at(start, size):
        z = _capped(v[:, start : start + size], opts)
        if lo is not None:
            cols = lax.broadcasted_iota(jnp.int32, z.shape, 1) + start
            z = jnp.where(cols >= lo, z, -jnp.inf)
        return z

    plain = opts.plan.plain_sums

    def total(entries):
        if plain:
            return jnp.sum(entries(0, width), -1)
        return _pairwise(entries, width, jnp.add, lambda b: jnp.sum(b, -1))

    if plain:
        m = jnp.max(z_at(0, width), -1)
    else:
        m = _pairwise(z_at, width, jnp.maximum, lambda b: jnp.max(b, -1))
    ref = _finite(m)[:, None]

    def e_at(start, size):
        # The label's own term is left out of q: with it at the max, T = lse - m = log1p(q)
        # keeps every digit of a tiny q (no 1 + tiny is rounded), and a_y - 1 = -q / S.
        e = jnp.exp(z_at(start, size) - ref)
        cols = lax.broadcasted_iota(jnp.int32, e.shape, 1) + start
        return jnp.where(cols == loc[:, None], jnp.zeros((), e.dtype), e)

    q = total(e_at)
    own = (loc >= first) & (loc < width)
    zy = jnp.take_along_axis(_capped(v, opts), jnp.clip(loc, 0, width - 1)[:, None], axis=1)
    zy = jnp.where(own, zy[:, 0], jnp.zeros((), zy.dtype))
    sd = k = None
    if opts.label_smoothing:

        def d_at(start, size):
            z = z_at(start, size)
            return jnp.where(jnp.isfinite(z), z - ref, jnp.zeros((), z.dtype))

        sd = total(d_at)
        k = total(lambda start, size: jnp.isfinite(z_at(start, size)).astype(v.dtype))
    return _Stats(m, q, zy, sd, k)


def _rescaled(st: _Stats, ref):
    """``st``'s sums taken relative to the new shift ``ref`` (>= its own), for adding up."""
    q = st.q * jnp.exp(st.m - ref)  # e^{-inf} = 0 for a set with nothing in it yet
    sd = None if st.sd is None else st.sd + st.k * (_finite(st.m) - ref)
    return q, sd


def _merge(a: _Stats, b: _Stats) -> _Stats:
    """The statistics of two sets of columns of the same rows (online logsumexp)."""
    m = jnp.maximum(a.m, b.m)
    ref = _finite(m)
    (qa, sda), (qb, sdb) = _rescaled(a, ref), _rescaled(b, ref)
    # One of the two factors e^{own - ref} is exactly 1; both sums are of like-signed terms.
    sd = None if a.sd is None else sda + sdb
    k = None if a.k is None else a.k + b.k
    return _Stats(m, qa + qb, a.zy + b.zy, sd, k)


def _across_shards(st: _Stats, axis_name) -> _Stats:
    """The statistics over the whole vocabulary when it is split over ``axis_name``: a
    ``pmax`` and one ``psum`` of a few numbers per row. The label's logit is owned by one
    shard; the others add 0."""
    if axis_name is None:
        return st
    m = lax.pmax(st.m, axis_name)
    q, sd = _rescaled(st, _finite(m))
    q, zy, sd, k = lax.psum((q, st.zy, sd, st.k), axis_name)
    return _Stats(m, q, zy, sd, k)


def _empty_stats(like, smoothing: bool, rows: int, dtype) -> _Stats:
    zeros = _zeros_varying((rows,), dtype, like)
    m = zeros - jnp.inf
    return _Stats(m, zeros, zeros, zeros if smoothing else None, zeros if smoothing else None)


def _row_terms(st: _Stats, weights, opts: _Options):
    r"""Per-row loss (times its weight) and the terms of its gradient, from the statistics.

    With :math:`r` the shift, :math:`d_y = z_y - r`, :math:`S = e^{d_y} + q` and
    :math:`T = S - 1 = (e^{d_y} - 1) + q`:
    :math:`\ell = \operatorname{log1p}(T) - (1 - \varepsilon) d_y - \tfrac{\varepsilon}{K}
    \sum_{\text{finite}} (z - r) + c\,\mathrm{lse}^2`, every term non-negative.
    """
    eps, c = opts.label_smoothing, opts.z_loss
    zero = jnp.zeros((), st.q.dtype)
    nonempty = ~(st.m == -jnp.inf)  # a NaN max (NaN or +inf logits) must reach the loss as NaN
    ref = _finite(st.m)
    dy = st.zy - ref
    ey = jnp.exp(dy)
    log_z = jnp.log1p(jnp.where(nonempty, (ey - 1.0) + st.q, zero))
    loss = log_z - ((1.0 - eps) * dy if eps else dy)
    k = None
    if eps:
        k = jnp.maximum(st.k, 1.0)
        loss = loss - (eps / k) * st.sd  # the eps/K share on every finite logit
    lse = jnp.where(nonempty, ref + log_z, zero)
    if c:
        # (sqrt(c)·lse)², not c·lse²: no overflow of lse² alone, no 0 · inf for a tiny c.
        loss = loss + (math.sqrt(c) * lse) ** 2
    # Weight 0 (ignored) and rows with no finite logit give exactly 0, whatever their loss; a
    # NaN weight (bad label) makes the row NaN.
    keep = (weights != 0) & nonempty
    rows = jnp.where(keep, loss * weights, zero)
    total = jnp.where(nonempty, ey + st.q, 1.0)  # S, 1 for an empty row
    factor = 1.0 + 2.0 * c * lse if c else 1.0
    # The label's component a_y - 1 as -q / S: never 1 - (almost 1).
    label = -st.q / total
    if c:
        label = label + 2.0 * c * lse * ey / total
    if eps:
        label = label + eps * (1.0 - jnp.isfinite(dy).astype(dy.dtype) / k)
    terms = _Terms(
        ref=ref,
        scale=factor / total,
        label=label,
        smooth=None if not eps else eps / k,
        weight=jnp.where(keep, weights, zero),
    )
    return rows, terms


def _tile_grad(v, loc, lo, terms: _Terms, r, opts: _Options):
    """``d loss / d u`` on one tile (``u`` the logits before the cap), for row scales ``r``.

    ``r`` [R]: the row's weight times its cotangent (0 for rows that contribute nothing).
    """
    z = _capped(v, opts)
    e = jnp.exp(z - terms.ref[:, None])
    dz = e * (r * terms.scale)[:, None]
    if terms.smooth is not None:
        dz = dz - (r * terms.smooth)[:, None] * jnp.isfinite(z).astype(z.dtype)
    cols = lax.broadcasted_iota(jnp.int32, z.shape, 1)
    dz = jnp.where(cols == loc[:, None], (r * terms.label)[:, None], dz)
    if lo is not None:  # columns of the previous tile: counted there
        dz = jnp.where(cols >= lo, dz, jnp.zeros((), dz.dtype))
    return dz if opts.softcap is None else _pre_cap_grad(dz, v)


def _pre_cap_grad(dz, v):
    """Chains the softcap: d(c·tanh(u/c))/du = (1 - v)(1 + v), as JAX's own tanh rule."""
    return dz * ((1.0 - v) * (1.0 + v))


def _grad_products(xc, wt, dz):
    """``dz @ wtᵀ`` ([R, D]) and ``xcᵀ @ dz`` ([D, T]), accumulated in float32 or wider."""
    acc = dz.dtype
    cdt = jnp.result_type(xc.dtype, wt.dtype)
    dzc = dz.astype(cdt)  # 16-bit inputs: the logits' gradient in their dtype, as autodiff has
    dx = lax.dot_general(dzc, wt.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=acc)
    dw = lax.dot_general(xc.astype(cdt), dzc, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    return dx, dw


# ---------------------------------------------------------------------------------------------
# Cutting the work: chunks of rows and tiles of vocabulary columns. When a size does not divide
# evenly, the last block is moved back to end at the edge, and its leading entries (covered by
# the block before) are left out: `lo` counts them. Nothing is padded, so nothing is copied.


def _start(i, size, total):
    """First index of block ``i`` (moved back to fit), and how many entries it repeats."""
    start = jnp.minimum(i * size, total - size)
    return start, i * size - start


def _slice(a, start, size, axis):
    if a is None or a.shape[axis] == size:
        return a
    return lax.dynamic_slice_in_dim(a, start, size, axis)


def _add_into(acc, start, part, axis):
    """``acc[start : start + len(part)] += part`` along ``axis``, in place."""
    if acc.shape[axis] == part.shape[axis]:
        return acc + part
    current = lax.dynamic_slice_in_dim(acc, start, part.shape[axis], axis)
    return lax.dynamic_update_slice_in_dim(acc, current + part, start, axis)


def _over_tiles(vocab: int, tile: int, body, carry):
    """``carry = body(start, lo, carry)`` for each tile of ``tile`` columns."""
    if vocab == 0:
        return carry
    count = -(-vocab // tile)
    if count == 1:
        return body(0, None, carry)
    ragged = vocab % tile != 0

    def step(t, carry):
        start, lo = _start(t, tile, vocab)
        return body(start, lo if ragged else None, carry)

    return lax.fori_loop(0, count, step, carry)


def _over_chunks(n: int, rows: int, body, carry):
    """``carry, per_row = body(start, repeated, carry)`` for each chunk of ``rows`` rows.

    ``repeated`` [rows] marks the rows that an earlier chunk covered (None when none do); the
    per-row outputs come back as ``[n, ...]``, each row once.
    """
    count = -(-n // rows)
    ragged = n % rows != 0

    def step(carry, c):
        start, lo = _start(c, rows, n)
        repeated = lax.broadcasted_iota(jnp.int32, (rows,), 0) < lo if ragged else None
        return body(start, repeated, carry)

    carry, per_row = lax.scan(step, carry, jnp.arange(count, dtype=jnp.int32))

    def unstack(a):
        if count * rows == n:
            return a.reshape(n, *a.shape[2:])
        head = a[:-1].reshape((count - 1) * rows, *a.shape[2:])
        return jnp.concatenate([head, a[-1, count * rows - n :]])

    return carry, jax.tree.map(unstack, per_row)


def _accumulate(xc, wt, start, dz, carry):
    """Adds one tile's ``dz`` [R, T] to the chunk's ``dx`` and to ``dw``/``dbias`` in place."""
    dxc, dw, db = carry
    dxt, dwt = _grad_products(xc, wt, dz)
    dw = _add_into(dw, start, dwt, 1)
    if db is not None:
        db = _add_into(db, start, _row_sum(dz, axis=0), 0)
    return dxc + dxt, dw, db


# ---------------------------------------------------------------------------------------------
# The custom_vjp core: x [N, D], w [D, V], b [V] or None, y [N] label ids local to this
# vocabulary shard, weights [N] row weights (0: dropped row, NaN: bad label, else 1 or 1/count).


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head(opts: _Options, x, w, b, y, weights):
    rows, _ = _forward_pass(opts, x, w, b, y, weights, with_terms=False)
    return _row_sum(rows) if opts.sum_rows else rows


def _head_fwd(opts: _Options, x, w, b, y, weights):
    if opts.plan.one_pass:
        return _one_pass(opts, x, w, b, y, weights)
    rows, terms = _forward_pass(opts, x, w, b, y, weights, with_terms=True)
    # Saved: the inputs, and five numbers per row (four without label smoothing).
    return (_row_sum(rows) if opts.sum_rows else rows), (x, w, b, y, terms)


def _head_bwd(opts: _Options, res, g):
    if opts.plan.one_pass:
        return _scale_saved_grads(opts, res, g)
    return _backward_pass(opts, res, g)


_head.defvjp(_head_fwd, _head_bwd)


def _empty_carry(x, w, b, like):
    acc = _accumulation_dtype(x.dtype, w.dtype)
    dx = _zeros_varying(x.shape, acc, like)
    dw = _zeros_varying(w.shape, acc, like)
    db = None if b is None else _zeros_varying(b.shape, acc, like)
    return dx, dw, db


def _finish_grads(dx, dw, db, x, w, b):
    dx = _fit_vma(dx.astype(x.dtype), x)
    dw = _fit_vma(dw.astype(w.dtype), w)
    db = None if b is None else _fit_vma(db.astype(b.dtype), b)
    return dx, dw, db, None, None


def _forward_pass(opts: _Options, x, w, b, y, weights, with_terms: bool):
    """Pass 1 of the two-pass schedule: per-row losses (and gradient terms), one matmul."""
    plan, vocab = opts.plan, w.shape[1]
    acc = _accumulation_dtype(x.dtype, w.dtype)
    like = (x, w, b, y, weights)

    def chunk(start, repeated, carry):
        xc, yc, wc = (_slice(a, start, plan.rows, 0) for a in (x, y, weights))

        def tile(c0, lo, st):
            v = _logits(xc, _slice(w, c0, plan.tile, 1), _slice(b, c0, plan.tile, 0), opts)
            return _merge(st, _tile_stats(v, yc - c0, lo, opts))

        empty = _empty_stats(like, bool(opts.label_smoothing), plan.rows, acc)
        st = _across_shards(_over_tiles(vocab, plan.tile, tile, empty), opts.axis_name)
        rows, terms = _row_terms(st, wc, opts)
        return carry, (rows, terms if with_terms else None)

    _, (rows, terms) = _over_chunks(x.shape[0], plan.rows, chunk, None)
    return rows, terms


def _one_pass(opts: _Options, x, w, b, y, weights):
    """The one-pass schedule ("sum"/"mean"): the loss and all gradients, three matmuls.

    Per chunk, one matmul forms the whole rows ``[R, V]``; walks over its tiles take the row
    statistics, then form ``dz`` and the other two products tile by tile, adding straight into
    ``dx`` and ``dw`` (which become the gradients: nothing ``[D, V]`` besides them).
    """
    plan, vocab = opts.plan, w.shape[1]
    acc = _accumulation_dtype(x.dtype, w.dtype)
    like = (x, w, b, y, weights)

    def chunk(start, repeated, carry):
        dx, dw, db = carry
        xc, yc, wc = (_slice(a, start, plan.rows, 0) for a in (x, y, weights))
        # The chunk's whole rows, as the product alone: the bias and the cap are applied where
        # the block is read (with them in it, XLA kept a second block-sized array).
        block = _product(xc, w)

        def stats_tile(c0, lo, st):
            cols = plan.stats_tile
            v = _finish(_slice(block, c0, cols, 1), _slice(b, c0, cols, 0), opts)
            return _merge(st, _tile_stats(v, yc - c0, lo, opts))

        empty = _empty_stats(like, bool(opts.label_smoothing), plan.rows, acc)
        st = _over_tiles(vocab, plan.stats_tile, stats_tile, empty)
        st = _across_shards(st, opts.axis_name)
        rows, terms = _row_terms(st, wc, opts)
        r = terms.weight
        if repeated is not None:  # rows of the previous chunk: their gradients are in already
            r = jnp.where(repeated, jnp.zeros((), r.dtype), r)

        # dz over the whole block, in its place; dx_c in one product over the whole vocabulary.
        dz = _tile_grad(_finish(block, b, opts), yc, None, terms, r, opts)
        cdt = jnp.result_type(xc.dtype, w.dtype)
        dzc = dz.astype(cdt)
        dxc = lax.dot_general(
            dzc, w.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=acc
        )

        def dw_tile(c0, lo, carry):
            # dw and dbias tile by tile, added in place: no [D, V] temporary.
            dw, db = carry
            dzt = _slice(dzc, c0, plan.tile, 1)
            if lo is not None:  # columns of the previous tile: counted there
                cols = lax.broadcasted_iota(jnp.int32, dzt.shape, 1)
                dzt = jnp.where(cols >= lo, dzt, jnp.zeros((), dzt.dtype))
            dwt = lax.dot_general(
                xc.astype(cdt), dzt, (((0,), (0,)), ((), ())), preferred_element_type=acc
            )
            dw = _add_into(dw, c0, dwt, 1)
            if db is not None:
                db = _add_into(db, c0, _row_sum(dzt.astype(acc), axis=0), 0)
            return dw, db

        dw, db = _over_tiles(vocab, plan.tile, dw_tile, (dw, db))
        return (_add_into(dx, start, dxc, 0), dw, db), rows

    (dx, dw, db), rows = _over_chunks(x.shape[0], plan.rows, chunk, _empty_carry(x, w, b, like))
    # Under axis_name each shard's dx is the part from its own vocabulary; _fit_vma sums it
    # (with check_vma=False, shard_map's own transpose does, as for any replicated input).
    # Saved: the finished gradients. The cotangent of a scalar loss only scales them.
    return _row_sum(rows), (dx, dw, db, x, w, b)


def _scale_saved_grads(opts: _Options, res, g):
    dx, dw, db, x, w, b = res
    g = _full_cotangent(g, w, opts).astype(dw.dtype)
    return _finish_grads(dx * g, dw * g, None if db is None else db * g, x, w, b)


def _backward_pass(opts: _Options, res, g):
    """Pass 2 of the two-pass schedule: recomputes each tile's logits, three matmuls."""
    x, w, b, y, terms = res
    plan, vocab = opts.plan, w.shape[1]
    g = _full_cotangent(g, w, opts)
    acc = _accumulation_dtype(x.dtype, w.dtype)
    like = (x, w, b, y, terms.weight, g)

    def chunk(start, repeated, carry):
        dx, dw, db = carry
        xc, yc = _slice(x, start, plan.rows, 0), _slice(y, start, plan.rows, 0)
        tc = jax.tree.map(lambda a: _slice(a, start, plan.rows, 0), terms)
        gc = g if opts.sum_rows else _slice(g, start, plan.rows, 0)
        # A dropped row stays exactly 0 even if its cotangent is not finite.
        r = jnp.where(tc.weight != 0, tc.weight * gc.astype(acc), jnp.zeros((), acc))
        if repeated is not None:
            r = jnp.where(repeated, jnp.zeros((), acc), r)

        def grad_tile(c0, lo, carry):
            wt = _slice(w, c0, plan.tile, 1)
            v = _logits(xc, wt, _slice(b, c0, plan.tile, 0), opts)
            return _accumulate(xc, wt, c0, _tile_grad(v, yc - c0, lo, tc, r, opts), carry)

        dxc = _zeros_varying((plan.rows, x.shape[1]), acc, like)
        dxc, dw, db = _over_tiles(vocab, plan.tile, grad_tile, (dxc, dw, db))
        return (_add_into(dx, start, dxc, 0), dw, db), None

    (dx, dw, db), _ = _over_chunks(x.shape[0], plan.rows, chunk, _empty_carry(x, w, b, like))
    return _finish_grads(dx, dw, db, x, w, b)


# ---------------------------------------------------------------------------------------------
# shard_map typing: accumulators start varying like the values added to them, and each
# cotangent is brought to its primal's varying axes (a psum where the primal is replicated).


def _vma(a) -> frozenset:
    if a is None:
        return frozenset()
    aval = jax.typeof(a)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _full_cotangent(g, w, opts: _Options):
    """The loss's cotangent as this shard's backward needs it.

    Under ``shard_map(check_vma=True)`` the loss is typed invariant over ``axis_name`` and each
    shard receives the whole cotangent. With ``check_vma=False``, shard_map hands each shard
    ``1/size`` of it and relies on every ``psum`` in the forward pass transposing to a ``psum``;
    the statistics here are ``psum`` s, so the cotangent is summed back the same way.
    """
    ax = opts.axis_name
    if ax is None:
        return g
    names = frozenset(ax) if isinstance(ax, tuple) else frozenset([ax])
    return g if names <= _vma(w) else lax.psum(g, ax)


def _zeros_varying(shape, dtype, like):
    z = jnp.zeros(shape, dtype)
    axes = frozenset().union(*(_vma(a) for a in like))
    if axes:
        z = lax.pcast(z, tuple(sorted(axes, key=str)), to="varying")
    return z


def _fit_vma(ct, primal):
    if ct is None:
        return None
    have, want = _vma(ct), _vma(primal)
    extra = tuple(sorted(have - want, key=str))
    if extra:
        ct = lax.psum(ct, extra)
    missing = tuple(sorted(want - have, key=str))
    if missing:
        ct = lax.pcast(ct, missing, to="varying")
    return ct
