r"""Vocab-parallel losses under plain ``jax.jit``: the class axis split over explicit mesh axes.

There are two ways to split the class axis of the logits over devices, and both must move only
per-row statistics, never the logits:

* **Inside** :func:`jax.shard_map`, the caller passes ``axis_name``. The losses then combine the
  row statistics with collectives (:mod:`jsoftmax._numerics`, :mod:`jsoftmax._targets`):

  .. math::

     m = \operatorname{pmax}_p\, m_p, \qquad
     \sum_i e^{z_i - m} = \operatorname{psum}_p \sum_{i \in \text{shard } p} e^{z_i - m}, \qquad
     z_y = \operatorname{psum}_p\, [y \in \text{shard } p]\; z_y,

  and likewise for ``K`` (label smoothing) and ``sum(y)``: :math:`O(\text{rows})` numbers cross
  devices, whatever the number of classes.

* **Outside** any map, under ``jax.jit`` with ``NamedSharding`` inputs. How the compiler sees
  the sharding depends on the mesh's axis types:

  - ``AxisType.Auto`` (``jax.sharding.Mesh`` and ``jax.make_mesh(..., axis_types=Auto)``): the
    sharding is invisible while tracing and XLA's SPMD partitioner propagates it. Every
    operation of the losses is an elementwise map, a reduction over the class axis or a
    one-element gather per row, and the partitioner splits each of these without gathering
    the class axis (a reduction becomes a local reduction plus an all-reduce of one number per
    row; the label's gather is masked on the shards that do not own it, then all-reduced).
    Nothing needs steering there; the test suite checks the compiled HLO for it.
  - ``AxisType.Explicit`` (what ``jax.make_mesh`` gives by default in JAX 0.10): the sharding is
    part of each array's type and every operation must have an unambiguous output sharding.
    A gather along a sharded axis has none (JAX asks for ``out_sharding=``, which would
    all-gather the operand). This module removes the question: when the class axis of the
    logits is split over explicit mesh axes, the loss runs its per-row part inside a
    :func:`jax.shard_map` over exactly the axes named in the logits' sharding, with
    ``axis_name`` set to the class axis' mesh axes, and applies the reduction outside, on the
    global per-example losses. The sharding of the result is the logits' batch sharding, and
    what crosses devices is, by construction, what the ``axis_name`` path sends: per-row
    statistics.

Labels and the class mask are resharded to the logits' layout first (integer labels to the
batch part of it); that is a local slice when they are replicated, and at most a move of
``O(rows)`` labels or of the mask otherwise.

The linear head (:func:`linear_over_mesh`) is handled the same way: under explicit axes, rows of
``x`` keep their split, the vocabulary axis of ``w`` becomes ``axis_name``, and one
``shard_map`` runs the chunked loss on each device's rows and vocabulary slice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import _targets as tg


def _full_spec(x: jax.Array) -> tuple[Any, ...] | None:
    """The explicit ``PartitionSpec`` of ``x`` padded to its rank, or None if it has none."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or not sharding.mesh.axis_names:
        return None
    spec = tuple(sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _names(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one ``PartitionSpec`` entry."""
    if entry is None or entry is P.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _axis_name(entry: Any) -> str | tuple[str, ...] | None:
    names = _names(entry)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


def class_mesh_axes(call: tg.Call) -> str | tuple[str, ...] | None:
    """The explicit mesh axes that split the class axis (last) of ``call.logits``, or None.

    None also when ``axis_name`` is given: the caller is inside a map and handles the split.
    """
    if call.options.axis_name is not None:
        return None
    spec = _full_spec(call.logits)
    return None if spec is None else _axis_name(spec[-1])


def vocab_parallel(loss_fn: Callable[..., jax.Array], call: tg.Call) -> jax.Array:
    """``loss_fn`` on a call whose class axis is split over explicit mesh axes.

    Runs ``loss_fn(..., reduction="none", axis_name=<class mesh axes>)`` inside a
    :func:`jax.shard_map` over the mesh axes that shard the logits, then applies the call's
    reduction to the global per-example losses (so ``"mean"`` counts the examples of every
    shard and skips ignored ones).

    Args:
      loss_fn: :func:`jsoftmax.cross_entropy` or :func:`jsoftmax.fused_cross_entropy`.
      call: a parsed call (class axis last) for which :func:`class_mesh_axes` is not None.

    Returns:
      The loss as ``loss_fn`` with ``call.reduction`` returns it; the per-example losses are
      sharded like the batch axes of the logits.
    """
    return _vocab_parallel(
        call.logits,
        call.labels,
        call.mask,
        loss_fn=loss_fn,
        options=call.options,
        reduction=call.reduction,
    )


# A jit of its own: called eagerly, a shard_map runs op by op (each op a program for the whole
# mesh); under jit it compiles once, and later eager calls hit the cache. Inside an outer jit
# this is inlined.
@functools.partial(jax.jit, static_argnames=("loss_fn", "options", "reduction"))
def _vocab_parallel(logits, labels, mask, *, loss_fn, options: tg.Options, reduction: str):
    mesh = jax.typeof(logits).sharding.mesh
    spec = _full_spec(logits)
    axis_name = _axis_name(spec[-1])
    manual = frozenset(n for entry in spec for n in _names(entry))
    row_spec, logit_spec = P(*spec[:-1]), P(*spec)
    label_spec = row_spec if options.kind == "int" else logit_spec
    args = [logits, jax.sharding.reshard(labels, NamedSharding(mesh, label_spec))]
    in_specs = [logit_spec, label_spec]
    if mask is not None:
        args.append(jax.sharding.reshard(mask, NamedSharding(mesh, logit_spec)))
        in_specs.append(logit_spec)

    def local(logits, labels, mask=None):
        return loss_fn(
            logits,
            labels,
            axis=-1,
            where=mask,
            label_smoothing=options.label_smoothing,
            ignore_index=options.ignore_index,
            z_loss=options.z_loss,
            reduction="none",
            axis_name=axis_name,
        )

    rows = jax.shard_map(
        local, mesh=mesh, in_specs=tuple(in_specs), out_specs=row_spec, axis_names=manual
    )(*args)
    ignored = None
    if options.kind == "int" and options.ignore_index is not None:
        ignored = labels == options.ignore_index
    return tg.reduce(rows, tg.Call(logits, labels, mask, options, reduction), ignored)


# ------------------------------------------------------------------------ the linear head


def on_auto_mesh(*arrays: jax.Array | None) -> bool:
    """Whether any of ``arrays`` lives on a mesh with an ``Auto`` axis of more than one device.

    Under ``AxisType.Auto`` the sharding is not part of the type, so a function cannot see
    which axis is split; XLA's partitioner decides. Code that would slice an axis at a traced
    offset (a walk over tiles) gathers that axis there, so callers take a whole-axis path.
    """
    for a in arrays:
        if a is None:
            continue
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is None or not mesh.axis_names:
            continue
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True):
            if kind == jax.sharding.AxisType.Auto and mesh.shape[name] > 1:
                return True
    return False


def linear_is_explicitly_sharded(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``x`` or ``w`` carries a sharding over explicit mesh axes in its type."""
    return any(any(_names(e) for e in (_full_spec(a) or ())) for a in (x, w))


def linear_over_mesh(
    linear_fn: Callable[..., jax.Array],
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None,
    reduction: str,
    **options: Any,
) -> jax.Array:
    """The linear head's loss when ``x`` or ``w`` is sharded over explicit mesh axes.

    The rows of ``x`` keep their split (data parallelism); the vocabulary axis of ``w`` keeps
    its split and becomes ``axis_name`` (vocab parallelism). Inside one :func:`jax.shard_map`
    over those mesh axes each device runs ``linear_fn`` on its rows and its vocabulary slice;
    what crosses devices is per-row statistics in the forward pass and, in the backward, the
    partial ``dx`` (summed over vocabulary shards) and ``dw`` (summed over row shards), exactly
    as in a hand-written data- and vocab-parallel step. The hidden axis ``D`` is gathered if it
    was split (of ``x`` or of ``w``): the algorithm contracts over it on each device.

    Args:
      linear_fn: :func:`jsoftmax.linear_cross_entropy`.
      x: ``[..., D]``. w: ``[D, V]``. labels: integer ``x.shape[:-1]``. bias: ``[V]`` or None.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over examples not ignored).
      **options: the remaining keyword options of ``linear_fn`` (not ``axis_name``).

    Returns:
      The loss as ``linear_fn`` returns it; per-example losses keep the rows' sharding.
    """
    return _linear_over_mesh(
        x,
        w,
        labels,
        bias,
        linear_fn=linear_fn,
        reduction=reduction,
        options=tuple(sorted(options.items())),
    )


@functools.partial(jax.jit, static_argnames=("linear_fn", "reduction", "options"))
def _linear_over_mesh(x, w, labels, bias, *, linear_fn, reduction, options):
    options = dict(options)
    x_spec = _full_spec(x) or (None,) * x.ndim
    w_spec = _full_spec(w) or (None, None)
    mesh = (jax.typeof(w) if _names(w_spec[-1]) else jax.typeof(x)).sharding.mesh
    vocab = _names(w_spec[-1])
    # Rows keep their mesh axes, except any the vocabulary already uses.
    rows = tuple(tuple(n for n in _names(e) if n not in vocab) or None for e in x_spec[:-1])
    row_names = tuple(n for e in rows for n in _names(e))
    manual = frozenset(vocab + row_names)
    axis_name = _axis_name(w_spec[-1])
    row_spec, x_in, w_in = P(*rows), P(*rows, None), P(None, axis_name)
    b_in = None if bias is None else P(axis_name)

    def put(a, spec):
        return None if a is None else jax.sharding.reshard(a, NamedSharding(mesh, spec))

    args = (put(x, x_in), put(w, w_in), put(labels, row_spec), put(bias, b_in))
    inner = "none" if reduction == "none" else "sum"

    def local(x, w, labels, bias):
        out = linear_fn(x, w, labels, bias=bias, reduction=inner, axis_name=axis_name, **options)
        return out if inner == "none" else out[None]  # one partial sum per row shard

    out_spec = row_spec if inner == "none" else P(row_names or None)
    out = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(x_in, w_in, row_spec, b_in),
        out_specs=out_spec,
        axis_names=manual,
    )(*args)
    if reduction == "none":
        return out
    total = jnp.sum(out)
    if reduction == "sum":
        return total
    ignore_index = options.get("ignore_index")
    kept = labels.size if ignore_index is None else jnp.sum(labels != ignore_index)
    return total / jnp.maximum(kept, 1).astype(total.dtype)
