"""Train a small next-token model on Python's own standard library with ``linear_cross_entropy``.

The text is every top-level ``*.py`` file of ``sysconfig.get_paths()["stdlib"]`` (about a
million tokens, shipped with Python: nothing is downloaded). A regex splits it into
identifiers, numbers, newlines and single punctuation characters; the most frequent ones form
the vocabulary (16384 by default, the rest map to ``<unk>``). The last 10% of the token stream
is held out.

The model reads a window of the previous ``context`` tokens: their embeddings are concatenated
and go through a two-layer GELU MLP to a ``dim``-wide hidden state, which the output head
``w: [dim, vocab]`` scores against the whole vocabulary. The loss is
``jsm.linear_cross_entropy(h, w, targets)``, trained with optax's AdamW; the ``[batch, vocab]``
logits are never formed. The script records the training and held-out loss, compares them with
the unigram baseline (the held-out cross-entropy of the training token frequencies), and
reports the memory (``memory_analysis``: temporaries, and temporaries + outputs) of one
training step with each head: the naive one (``h @ w`` + optax), ``linear_cross_entropy``, and
tokamax's ``chunked_xla`` where it is installed (Python >= 3.12), at the run's sizes and at 8x
its batch (compile only).

Writes ``train_lm.json`` and ``train_lm.png`` (loss curves) under ``experiments/results/``.

Examples::

    python experiments/train_lm.py            # about two minutes on 2 CPU cores
    python experiments/train_lm.py --quick    # a few seconds: a smoke test
"""

from __future__ import annotations

import argparse
import collections
import re
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jsoftmax._linear import linear_cross_entropy

try:
    import tokamax
except ImportError:  # needs Python >= 3.12 and jax >= 0.11: pip install "jsoftmax[tokamax]"
    tokamax = None

TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\n|[^\sA-Za-z0-9_]")
UNK = "<unk>"


def stdlib_tokens(max_files: int | None = None) -> tuple[list[str], int]:
    """Tokens of the top-level stdlib ``*.py`` files, in sorted file order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    tokens: list[str] = []
    for f in files:
        tokens.extend(TOKEN.findall(f.read_text(encoding="utf-8", errors="replace")))
    return tokens, len(files)


def build_vocab(tokens: Sequence[str], size: int) -> dict[str, int]:
    """``<unk>`` is id 0; then the ``size - 1`` most frequent tokens (ties by first sight)."""
    counts = collections.Counter(tokens)
    words = [w for w, _ in counts.most_common(size - 1)]
    return {UNK: 0, **{w: i + 1 for i, w in enumerate(words)}}


def encode(tokens: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    return np.fromiter((vocab.get(t, 0) for t in tokens), dtype=np.int32, count=len(tokens))


def init_params(key, vocab: int, embed: int, context: int, hidden: int, dim: int):
    k = jax.random.split(key, 4)

    def dense(key, n_in, n_out):
        return jax.random.normal(key, (n_in, n_out), jnp.float32) / np.sqrt(n_in)

    return {
        "embed": jax.random.normal(k[0], (vocab, embed), jnp.float32) * 0.1,
        "w1": dense(k[1], context * embed, hidden),
        "b1": jnp.zeros(hidden),
        "w2": dense(k[2], hidden, dim),
        "b2": jnp.zeros(dim),
        "head": dense(k[3], dim, vocab) * 0.1,
        "head_bias": jnp.zeros(vocab),
    }


def hidden_states(params, windows):
    """``windows [B, context]`` token ids -> hidden states ``[B, dim]``."""
    e = params["embed"][windows]  # [B, context, embed]
    h = e.reshape(e.shape[0], -1)
    h = jax.nn.gelu(h @ params["w1"] + params["b1"][None, :])
    h = jax.nn.gelu(h @ params["w2"] + params["b2"][None, :])
    return h


def chunked_loss(params, windows, targets):
    h = hidden_states(params, windows)
    return linear_cross_entropy(h, params["head"], targets, bias=params["head_bias"])


def naive_loss(params, windows, targets):
    h = hidden_states(params, windows)
    logits = h @ params["head"] + params["head_bias"][None, :]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def tokamax_loss(params, windows, targets):
    h = hidden_states(params, windows)
    # tokamax's head takes no bias: it rides as one more row of w, against a constant-1 feature.
    h1 = jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)
    w1 = jnp.concatenate([params["head"], params["head_bias"][None, :]], axis=0)
    return tokamax.linear_softmax_cross_entropy_loss(
        h1, targets, w1, reduction="mean", implementation="chunked_xla"
    )


HEADS = {"naive": naive_loss, "jsoftmax": chunked_loss, "tokamax": tokamax_loss}


def windows_at(stream: np.ndarray, positions: np.ndarray, context: int):
    """The ``context`` tokens before each position, and the token at it."""
    idx = positions[:, None] + np.arange(-context, 0)[None, :]
    return stream[idx], stream[positions]


def step_memory(loss, optimizer, params, batch: int, context: int) -> dict[str, float]:
    """Memory of one compiled training step (shapes only: nothing runs), in MiB.

    ``temp_mib``: temporaries; ``output_mib``: the new parameters, optimizer state and loss;
    ``peak_mib``: their sum (the arguments, the old parameters and state, come on top).
    """

    def step(params, opt_state, windows, targets):
        value, grads = jax.value_and_grad(loss)(params, windows, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
        (params, jax.eval_shape(optimizer.init, params)),
    )
    args = (
        *shapes,
        jax.ShapeDtypeStruct((batch, context), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    )
    stats = jax.jit(step).lower(*args).compile().memory_analysis()
    temp = stats.temp_size_in_bytes / 2**20
    out = stats.output_size_in_bytes / 2**20
    return {"temp_mib": temp, "output_mib": out, "peak_mib": temp + out}


def step_memory_by_head(
    batch: int,
    tokamax_head: bool = tokamax is not None,
    vocab: int = 16384,
    embed: int = 64,
    context: int = 8,
    hidden: int = 256,
    dim: int = 128,
) -> dict:
    """``step_memory`` of the model (default sizes) with each head: naive, jsoftmax, tokamax."""
    params = jax.eval_shape(
        lambda: init_params(jax.random.key(0), vocab, embed, context, hidden, dim)
    )
    optimizer = optax.adamw(1e-3, weight_decay=1e-4)
    names = ["naive", "jsoftmax"] + (["tokamax"] if tokamax_head else [])
    return {
        "batch": batch,
        "vocab": vocab,
        "dim": dim,
        "heads": {
            name: step_memory(HEADS[name], optimizer, params, batch, context) for name in names
        },
    }


def unigram_baseline(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Held-out cross-entropy (nats) of add-one-smoothed training token frequencies."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-np.mean(logp[val]))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few files, a small vocabulary and model, 30 steps: a smoke test",
    )
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--context", type=int, default=8)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)
    max_files = None
    if args.quick:
        max_files, args.vocab, args.steps, args.batch = 8, 1024, 30, 128
        args.embed, args.hidden, args.dim = 16, 128, 64
        args.eval_every, args.eval_tokens = 10, 1024

    tokens, num_files = stdlib_tokens(max_files)
    vocab = build_vocab(tokens[: int(0.9 * len(tokens))], args.vocab)
    stream = encode(tokens, vocab)
    split = int(0.9 * len(stream))
    train, val = stream[:split], stream[split:]
    print(
        f"{num_files} files, {len(stream)} tokens ({len(train)} train, {len(val)} held out), "
        f"vocabulary {len(vocab)} ({np.mean(stream == 0):.1%} <unk>)"
    )

    rng = np.random.default_rng(args.seed)
    params = init_params(
        jax.random.key(args.seed), len(vocab), args.embed, args.context, args.hidden, args.dim
    )
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.05), weight_decay=1e-4
    )
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, windows, targets):
        loss, grads = jax.value_and_grad(chunked_loss)(params, windows, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(chunked_loss)
    val_pos = np.arange(args.context, len(val))
    val_pos = val_pos[
        np.linspace(0, len(val_pos) - 1, min(args.eval_tokens, len(val_pos))).astype(int)
    ]
    val_windows, val_targets = windows_at(val, val_pos, args.context)

    # The two heads agree at initialization: the same value, one of them chunked.
    w0, t0 = windows_at(train, rng.integers(args.context, len(train), args.batch), args.context)
    agree = abs(float(eval_loss(params, w0, t0)) - float(jax.jit(naive_loss)(params, w0, t0)))

    curve = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    start = time.perf_counter()
    for step in tqdm(range(args.steps + 1), desc="train"):
        if step % args.eval_every == 0 or step == args.steps:
            curve["val_step"].append(step)
            curve["val_loss"].append(float(eval_loss(params, val_windows, val_targets)))
        if step == args.steps:
            break
        pos = rng.integers(args.context, len(train), args.batch)
        windows, targets = windows_at(train, pos, args.context)
        params, opt_state, loss = train_step(params, opt_state, windows, targets)
        curve["step"].append(step)
        curve["train_loss"].append(float(loss))
    seconds = time.perf_counter() - start

    memory = {}
    names = ["naive", "jsoftmax"] + (["tokamax"] if tokamax is not None else [])
    for batch in (args.batch,) if args.quick else (args.batch, 8 * args.batch):
        memory[str(batch)] = {
            name: step_memory(HEADS[name], optimizer, params, batch, args.context) for name in names
        }
    baseline = unigram_baseline(train, val, len(vocab))
    result = {
        "config": vars(args),
        "data": {
            "files": num_files,
            "tokens": len(stream),
            "train_tokens": len(train),
            "val_tokens": len(val),
            "vocab": len(vocab),
            "unk_fraction": float(np.mean(stream == 0)),
        },
        "loss_curve": curve,
        "final_val_loss": curve["val_loss"][-1],
        "final_val_perplexity": float(np.exp(curve["val_loss"][-1])),
        "unigram_val_loss": baseline,
        "init_loss_naive_vs_chunked_abs_diff": agree,
        "train_seconds": seconds,
        "step_memory_mib": memory,
    }

    print(
        f"held-out loss {curve['val_loss'][0]:.3f} -> {curve['val_loss'][-1]:.3f} nats "
        f"(perplexity {result['final_val_perplexity']:.1f}); unigram baseline "
        f"{baseline:.3f}; {args.steps} steps in {seconds:.1f} s"
    )
    print(f"naive vs chunked loss at init: |diff| = {agree:.2e}")
    for batch, m in memory.items():
        cells = ", ".join(
            f"{name} {c['peak_mib']:.1f} MiB (temporaries {c['temp_mib']:.1f})"
            for name, c in m.items()
        )
        print(f"training-step peak memory, batch {batch}: {cells}")

    out = _common.results_dir(args.out)
    _common.write_json(out / "train_lm.json", result)
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["step"], curve["train_loss"], lw=0.8, alpha=0.6, label="train (batch)")
    ax.plot(curve["val_step"], curve["val_loss"], "o-", label="held out")
    ax.axhline(baseline, color="gray", ls="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"stdlib next-token model, vocab {len(vocab)}, jsm.linear_cross_entropy")
    ax.legend()
    _common.save_figure(fig, out / "train_lm.png")
    print(f"wrote {out / 'train_lm.json'} and {out / 'train_lm.png'}")
    return result


if __name__ == "__main__":
    main()
