"""Several hosts, for real: processes joined by ``jax.distributed`` on this machine.

Starts ``--processes`` Python processes (2 by default) with ``--devices`` CPU devices each (2),
joined by :func:`jax.distributed.initialize` on a free localhost port, their collectives
carried by gloo, as separate hosts' would be over a network. On the global mesh
``("data", "model")`` the class axis ("model") runs *across* the processes, so the per-row
statistics of the losses cross process boundaries. Each process checks, for a batch with every
edge case of the loss contract (a -inf logit under the label, an all -inf row, an out-of-range
label, an ignored label, an excluded class, a confident row) and every option (label
smoothing, z-loss, ``ignore_index``, ``where``), that these give the single-device value and
gradients (on the shards it holds):

* ``fused_cross_entropy`` under ``jax.jit`` with ``NamedSharding`` inputs, on ``Explicit`` and
  on ``Auto`` mesh axes;
* ``fused_cross_entropy`` inside ``jax.shard_map`` with ``axis_name="model"``;
* ``linear_cross_entropy`` inside ``jax.shard_map`` with ``w`` split by vocabulary.

    python experiments/multihost.py                      # 2 processes x 2 CPU devices
    python experiments/multihost.py --processes 4 --devices 1

Writes ``multihost.json`` under ``experiments/results/`` (or ``--out``), prints one line per
check and process, and exits non-zero if any check failed or a process did not finish within
``--timeout`` seconds (the processes are then killed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

B, C, D = 8, 24, 6  # rows, classes, hidden size of the linear head
IGNORE = -100
OPTIONS = {"label_smoothing": 0.1, "z_loss": 0.01, "ignore_index": IGNORE}
RTOL, ATOL = 2e-5, 2e-6


def free_port() -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case():
    """Logits, integer labels, class mask, per-row cotangent; x, w for the linear head."""
    rng = np.random.default_rng(0)
    z = (rng.normal(size=(B, C)) * 2).astype(np.float32)
    z[0, [5, 11, 17]] = -np.inf  # -inf logits off the label
    z[2, 10] = -np.inf  # the label's logit is -inf: loss +inf
    z[3] = -np.inf  # nothing included: loss 0, gradient 0
    z[7, 17] = 40.0  # confident
    y = np.array([0, C - 1, 10, 5, C + 3, IGNORE, 13, 17], np.int32)  # 4: bad, 5: ignored
    mask = np.ones((B, C), bool)
    mask[:, [2, 9, 13, 20]] = False  # one excluded class per shard; row 6's label is one
    cot = np.arange(1, B + 1, dtype=np.float32)
    x = rng.normal(size=(B, D)).astype(np.float32)
    w = (rng.normal(size=(D, C)) * 0.7).astype(np.float32)
    y_linear = np.array([0, C - 1, 3, IGNORE, 12, 7, 18, 1], np.int32)
    return z, y, mask, cot, x, w, y_linear


# ------------------------------------------------------------------------------ one process


def worker(process_id: int, processes: int, port: int, result_path: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    import jax.numpy as jnp
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax as jsm

    z, y, mask, cot, x, w, y_linear = case()
    per = jax.local_device_count()
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    # [i, p]: local device i of process p; "model" (axis 1) runs across the processes.
    grid = np.array(devices, dtype=object).reshape(processes, per).T

    def loss(z, y):
        return jsm.fused_cross_entropy(z, y, where=mask, reduction="mean", **OPTIONS)

    def jit_step(z, y):
        return jax.value_and_grad(loss)(z, y)

    def rows_step(fn):
        def step(z, y):
            rows, pullback = jax.vjp(lambda z: fn(z, y), z)
            return rows, pullback(jnp.asarray(cot))[0]

        return step

    def fused_rows(z, y):
        return jsm.fused_cross_entropy(z, y, where=mask, **OPTIONS)

    def linear_rows(x, w, y):
        return jsm.linear_cross_entropy(x, w, y, reduction="none", chunk_size=3, **OPTIONS)

    def linear_step(x, w, y):
        rows, pullback = jax.vjp(lambda x, w: linear_rows(x, w, y), x, w)
        return rows, pullback(jnp.asarray(cot))

    # Single-device references, on this process's first device.
    local = jax.local_devices()[0]
    ref = {
        "jit": jax.jit(jit_step, device=local)(z, y),
        "shard_map": jax.jit(rows_step(fused_rows), device=local)(z, y),
        "linear": jax.jit(linear_step, device=local)(x, w, y_linear),
    }

    def put(a, mesh, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    results = []

    def compare(name, got, want):
        worst, ok, shards = 0.0, True, 0
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            r = np.asarray(r)
            for shard in g.addressable_shards:
                a, b = np.asarray(shard.data), r[shard.index]
                shards += 1
                same_special = np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(
                    np.isinf(a) & (a > 0), np.isinf(b) & (b > 0)
                )
                fin = np.isfinite(a) & np.isfinite(b)
                err = float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))
                worst = max(worst, err)
                ok = ok and same_special and np.allclose(a[fin], b[fin], RTOL, ATOL)
        results.append({"check": name, "max_abs_error": worst, "shards": shards, "passed": ok})

    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = Mesh(grid, ("data", "model"), axis_types=(axis_type,) * 2)
        args = (put(z, mesh, P("data", "model")), put(y, mesh, P("data")))
        got = jax.jit(jit_step)(*args)
        compare(f"jit fused_cross_entropy ({axis_type.name} axes)", got, ref["jit"])

    mesh = Mesh(grid, ("data", "model"))

    def local_rows(z, y, m):
        return jsm.fused_cross_entropy(z, y, where=m, axis_name="model", **OPTIONS)

    mapped = jax.shard_map(
        local_rows,
        mesh=mesh,
        in_specs=(P("data", "model"), P("data"), P("data", "model")),
        out_specs=P("data"),
    )

    def mapped_step(z, y, m):
        return rows_step(lambda z, y: mapped(z, y, m))(z, y)

    got = jax.jit(mapped_step)(
        put(z, mesh, P("data", "model")),
        put(y, mesh, P("data")),
        put(mask, mesh, P("data", "model")),
    )
    compare("shard_map fused_cross_entropy (axis_name)", got, ref["shard_map"])

    def local_linear(x, w, y):
        return jsm.linear_cross_entropy(
            x, w, y, reduction="none", chunk_size=3, axis_name="model", **OPTIONS
        )

    mapped_linear = jax.shard_map(
        local_linear,
        mesh=mesh,
        in_specs=(P("data", None), P(None, "model"), P("data")),
        out_specs=P("data"),
    )

    def mapped_linear_step(x, w, y):
        rows, pullback = jax.vjp(lambda x, w: mapped_linear(x, w, y), x, w)
        return rows, pullback(jnp.asarray(cot))

    got = jax.jit(mapped_linear_step)(
        put(x, mesh, P("data", None)),
        put(w, mesh, P(None, "model")),
        put(y_linear, mesh, P("data")),
    )
    compare("shard_map linear_cross_entropy (axis_name)", got, ref["linear"])

    report = {
        "process": process_id,
        "processes": processes,
        "local_devices": per,
        "global_devices": len(devices),
        "checks": results,
    }
    Path(result_path).write_text(json.dumps(report))
    jax.distributed.shutdown()


# ------------------------------------------------------------------------------ the launcher


def launch(processes: int, devices: int, timeout: float) -> list[dict]:
    """Runs the workers; returns their reports (a process that failed reports its error)."""
    port = free_port()
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(processes):
            out = Path(tmp, f"process{i}.json")
            cmd = [sys.executable, __file__, "--worker", str(i), "--port", str(port)]
            cmd += ["--processes", str(processes), "--result", str(out)]
            log = open(Path(tmp, f"process{i}.log"), "w")  # noqa: SIM115 - closed below
            procs.append(
                (
                    subprocess.Popen(
                        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    ),
                    out,
                    log,
                )
            )
        deadline = time.monotonic() + timeout
        reports = []
        try:
            for proc, _, _ in procs:
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for proc, _, _ in procs:  # every process is gone when this returns
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for i, (proc, out, log) in enumerate(procs):
            log.close()
            if proc.returncode == 0 and out.exists():
                reports.append(json.loads(out.read_text()))
                continue
            tail = Path(log.name).read_text()[-3000:]
            reason = (
                "timed out" if proc.returncode == -signal.SIGKILL else f"exit {proc.returncode}"
            )
            reports.append({"process": i, "error": f"{reason}:\n{tail}", "checks": []})
    return reports


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="processes (hosts)")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole run")
    parser.add_argument("--out", default=None, help="output directory (default results/)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.processes, args.port, args.result)
        return {}
    if (C % args.processes) or (B % args.devices):
        parser.error(f"--processes must divide {C} classes and --devices {B} rows")
    start = time.perf_counter()
    reports = launch(args.processes, args.devices, args.timeout)
    seconds = time.perf_counter() - start
    passed = all("error" not in r and r["checks"] for r in reports) and all(
        c["passed"] for r in reports for c in r["checks"]
    )
    for r in reports:
        if "error" in r:
            print(f"process {r['process']}: {r['error']}")
        for c in r["checks"]:
            print(
                f"process {r['process']}: {c['check']}: max |error| {c['max_abs_error']:.2e} "
                f"on {c['shards']} shards: {'PASS' if c['passed'] else 'FAIL'}"
            )
    summary = (
        f"multihost: {'all checks passed' if passed else 'FAILED'} on {args.processes} processes "
        f"x {args.devices} CPU devices ({seconds:.1f} s)"
    )
    print(summary)
    result = {
        "processes": args.processes,
        "devices_per_process": args.devices,
        "seconds": seconds,
        "passed": passed,
        "summary": summary,
        "reports": reports,
    }
    from _common import results_dir, write_json

    write_json(results_dir(args.out) / "multihost.json", result)
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome.get("passed", True) else 1)
