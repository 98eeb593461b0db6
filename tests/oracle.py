"""An independent float64 NumPy oracle, written from the formulas of the API contract.

It shares no code with the package: it reads the contract's words (targets, smoothing on the K
included finite classes, ignore_index, bad labels, empty rows, z-loss, reductions) and turns
them into NumPy, one example at a time where that is clearer.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 log-softmax of the last axis; -inf where excluded; -inf rows stay -inf."""
    z = np.asarray(z, np.float64)
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    m = np.max(z, -1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    # log(sum exp(z - m)) = log1p(sum over all entries but one argmax): float64 keeps the
    # digits of a tiny remainder that log(1 + remainder) would round away.
    e = np.exp(z - m)
    first = np.argmax(z, -1)[..., None]
    np.put_along_axis(e, first, 0.0, -1)
    empty = np.all(np.isneginf(z), -1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_z = np.log1p(np.sum(e, -1, keepdims=True))
        return np.where(empty, -np.inf, (z - m) - log_z)


def softmax(z, mask=None):
    return np.exp(log_softmax(z, mask))


def logsumexp(z: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float64 log of the sum of exponentials over the last axis; -inf for an empty row."""
    z = np.asarray(z, np.float64)
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    m = np.max(z, -1)
    finite_m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(divide="ignore"):
        return finite_m + np.log(np.sum(np.exp(z - finite_m[..., None]), -1))


def cross_entropy(
    logits,
    labels,
    *,
    where=None,
    label_smoothing=0.0,
    ignore_index=None,
    z_loss=0.0,
    reduction="none",
):
    """Loss and gradient with respect to the logits (class axis last), in float64.

    Returns ``(loss, grad_logits, grad_labels)``; ``grad_labels`` is None for integer labels.
    The gradients are those of the reduced loss.
    """
    z = np.asarray(logits, np.float64)
    c = z.shape[-1]
    mask = np.ones(z.shape, bool) if where is None else np.broadcast_to(where, z.shape)
    zm = np.where(mask, z, -np.inf)
    integer = np.issubdtype(np.asarray(labels).dtype, np.integer)
    batch = z.shape[:-1]
    losses = np.zeros(batch)
    grads = np.zeros(z.shape)
    glabels = None if integer else np.zeros(z.shape)
    ignored = np.zeros(batch, bool)
    for idx in np.ndindex(*batch):
        row, inc = zm[idx], mask[idx]
        if integer and ignore_index is not None and int(np.asarray(labels)[idx]) == ignore_index:
            ignored[idx] = True  # left out of the mean, even when its row is empty
        if not np.any(row > -np.inf):  # nothing included: loss 0, gradient 0
            continue
        logp = log_softmax(row)
        a = np.exp(logp)
        finite = inc & np.isfinite(row)
        k = finite.sum()
        if integer:
            lab = int(np.asarray(labels)[idx])
            if ignored[idx]:
                continue
            if not (0 <= lab < c) or not inc[lab]:
                losses[idx] = np.nan
                grads[idx] = np.where(inc, np.nan, 0.0)  # excluded classes keep gradient 0
                continue
            y = np.zeros(c)
            y[lab] = 1.0
        else:
            y = np.where(inc, np.asarray(labels, np.float64)[idx], 0.0)
        target = (1 - label_smoothing) * y + label_smoothing * finite / max(k, 1)
        target = np.where(inc, target, 0.0)
        with np.errstate(invalid="ignore"):
            terms = np.where(target == 0, 0.0, -target * logp)
        lse = np.log(np.sum(np.exp(row[np.isfinite(row)] - row.max()))) + row.max()
        losses[idx] = terms.sum() + z_loss * lse**2
        grads[idx] = a * target.sum() - target + 2 * z_loss * lse * a
        if glabels is not None:
            # d loss / d y = -(1 - eps) log a on included classes; 0 · log 0 = 0: a zero
            # target on a -inf logit contributes nothing, so its label gradient is 0 too.
            zero_log_zero = (target == 0) & np.isneginf(logp)
            glabels[idx] = np.where(inc & ~zero_log_zero, -(1 - label_smoothing) * logp, 0.0)
    if reduction == "none":
        return losses, grads, glabels
    if reduction == "sum":
        return losses.sum(), grads, glabels
    count = max(int((~ignored).sum()), 1)
    scale = 1.0 / count
    return losses.sum() * scale, grads * scale, None if glabels is None else glabels * scale
