"""Scaling out: capture throughput with 2 shard processes vs 1, and store writes to S3 vs local disk.

Part 1 (capture): the same plan (tiny-sd by default) captured into a fresh local store by one process,
and by two ``--shard I/2`` processes writing one store. Workers import torch and load the pipeline
first, report ready, and all start capturing together on a "go"; throughput = samples / (last end -
first start), so imports and loading are not counted. The 2-process store is checked bitwise against
the 1-process store. Repetitions alternate 1 / 2 processes.

Part 2 (writes): synthetic samples (a trajectory-shaped float32 group, zstd as always) written with
``trajlab.store.write_samples`` + ``mark_complete`` into a local store and into a local S3-compatible
server (moto, started here on 127.0.0.1), alternating. moto is a single Python process: this measures
the object-store code path and its request overhead, not what a real S3 endpoint sustains.

Both parts run in one invocation, side by side; the last line is the headline ratio
(2-process / 1-process capture throughput). Each process uses --threads torch threads (default 1).

    python benchmarks/capture_scaling.py                  # ~2-4 min on a 2-core CPU box
    python benchmarks/capture_scaling.py --seeds 32 --steps 20 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- part 1: capture workers ------------------------------------------------------------------------------
def _plan(args):
    from trajlab.experiments.plans import expand_cell

    cell = {"model": args.model, "steps": args.steps, "height": args.size, "width": args.size,
            "batch_size": args.batch, "group": "g", "images": True}
    (plan,) = expand_cell(cell, prompts=["a cat", "a dog"], seeds=list(range(args.seeds)))
    return plan


def worker(args) -> None:
    """Load, say ready, wait for go on stdin, capture this shard, print a JSON line of timings."""
    import torch

    torch.set_num_threads(args.threads)
    from trajlab.capture.run import capture
    from trajlab.experiments.plans import PipelineCache, plan_pipeline

    plan = _plan(args)
    pipe = plan_pipeline(plan, PipelineCache())
    print("ready", flush=True)
    sys.stdin.readline()
    t0 = time.time()
    res = capture(pipe, plan, args.out, group="g", progress=False, shard=args.shard)
    print(json.dumps({"start": t0, "end": time.time(), "samples": res.samples_written}), flush=True)


def run_capture(args, n_proc: int, out: str) -> float:
    """Samples/s of one capture by ``n_proc`` shard processes (1 = no sharding)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    procs = []
    for i in range(n_proc):
        cmd = [sys.executable, __file__, "--worker", "--out", out, "--model", args.model, "--steps", str(args.steps),
               "--size", str(args.size), "--batch", str(args.batch), "--seeds", str(args.seeds),
               "--threads", str(args.threads)]
        if n_proc > 1:
            cmd += ["--shard", f"{i}/{n_proc}"]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
    for p in procs:
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker failed before capture: {line!r}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out_lines, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(f"worker exited {p.returncode}")
        results.append(json.loads(out_lines.strip().splitlines()[-1]))
    samples = sum(r["samples"] for r in results)
    if samples != 2 * args.seeds:
        raise RuntimeError(f"captured {samples} samples, expected {2 * args.seeds}")
    return samples / (max(r["end"] for r in results) - min(r["start"] for r in results))


def same_store(a: str, b: str) -> bool:
    import numpy as np

    from trajlab import store

    x, y = store.open_group(a, "g").load(), store.open_group(b, "g").load()
    return all(np.array_equal(x[v].values, y[v].values, equal_nan=x[v].dtype.kind == "f") for v in x.variables)


# -- part 2: store writes ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3():
    """moto's S3 server on 127.0.0.1 (bucket ``bench``); this process's env points s3fs at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("bench")
    return server


def write_store(path: str, args, rng) -> tuple[float, float]:
    """(MB/s of raw sample data, samples/s) writing ``args.write_samples`` synthetic samples into ``path``."""
    import numpy as np

    from trajlab import store

    S, T, B = args.write_samples, args.steps, args.batch
    shape = (4, args.write_latent, args.write_latent)
    variables = ("latent", "x0_pred", "model_output", "model_output_uncond", "model_output_cond")
    layout = store.GroupLayout(n_samples=S, n_steps=T, latent_shape=shape, dtype="float32", step_variables=variables)
    t0 = time.perf_counter()
    store.allocate_group(path, "g", layout, timesteps=np.arange(T)[::-1] * 10, alpha_bar=np.linspace(0.01, 0.99, T),
                         seeds=np.arange(S), prompt_index=np.zeros(S, dtype=int), prompts=["x"], attrs={"config": {}})
    nbytes = 0
    for start in range(0, S, B):
        n = min(B, S - start)
        arrays = {v: rng.standard_normal((n, T, *shape), dtype=np.float32) for v in variables}
        arrays["final_latent"] = rng.standard_normal((n, *shape), dtype=np.float32)
        nbytes += sum(a.nbytes for a in arrays.values())
        store.write_samples(path, "g", start, arrays)
        store.mark_complete(path, "g", start, start + n)
    wall = time.perf_counter() - t0
    assert store.completed(path, "g").all()
    return nbytes / 1e6 / wall, S / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=32, help="image height = width in pixels")
    ap.add_argument("--batch", type=int, default=4, help="samples per block (--batch-size)")
    ap.add_argument("--seeds", type=int, default=16, help="seeds per prompt (2 prompts)")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of each configuration (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--write-samples", type=int, default=64, help="synthetic samples per store-write measurement")
    ap.add_argument("--write-latent", type=int, default=32, help="synthetic latent y = x (4 channels, --steps steps, "
                    "5 step variables: ~0.8 MB per sample at 32 and 10 steps)")
    ap.add_argument("--skip-s3", action="store_true", help="skip part 2's S3 side (no moto / s3fs installed)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="trajlab-scaling-")
    try:
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; model {args.model}, {args.steps} steps, {args.size}px, "
              f"{2 * args.seeds} samples in blocks of {args.batch}, {args.threads} thread(s) per process", flush=True)
        tput = {1: [], 2: []}
        for rep in range(args.reps):
            for n in (1, 2):
                out = f"{tmp}/cap-{n}-{rep}.zarr"
                tput[n].append(run_capture(args, n, out))
                print(f"capture rep {rep}: {n} process(es): {tput[n][-1]:.2f} samples/s", flush=True)
            if not same_store(f"{tmp}/cap-1-{rep}.zarr", f"{tmp}/cap-2-{rep}.zarr"):
                raise SystemExit("2-process store differs from the 1-process store")
        one, two = statistics.median(tput[1]), statistics.median(tput[2])
        print(f"capture: 1 process {one:.2f} samples/s, 2 shard processes {two:.2f} samples/s "
              f"(median of {args.reps}); stores bitwise identical")

        rng = np.random.default_rng(0)
        local, s3 = [], []
        server = None if args.skip_s3 else start_s3()
        try:
            for rep in range(args.reps):
                local.append(write_store(f"{tmp}/w-{rep}.zarr", args, rng))
                if server is not None:
                    s3.append(write_store(f"s3://bench/w-{rep}.zarr", args, rng))
        finally:
            if server is not None:
                server.stop()
        mb_local = statistics.median(r[0] for r in local)
        print(f"writes: local disk {mb_local:.1f} MB/s ({statistics.median(r[1] for r in local):.1f} samples/s)")
        if s3:
            mb_s3 = statistics.median(r[0] for r in s3)
            print(f"writes: S3 (moto on 127.0.0.1) {mb_s3:.1f} MB/s ({statistics.median(r[1] for r in s3):.1f} samples/s)")
            print(f"ratio: S3 / local write throughput = {mb_s3 / mb_local:.2f}x")
        print(f"ratio: 2-process / 1-process capture throughput = {two / one:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
