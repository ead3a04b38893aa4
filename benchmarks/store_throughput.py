"""Store throughput: writes (and streamed reads) to a local S3-compatible server vs local disk.

Writes: synthetic trajectory-shaped float32 samples written with ``trajlab.store.write_samples`` +
``mark_complete`` (benchmarks/capture_scaling.py's part 2, the same function) into a local store and into
moto's S3 server started here on 127.0.0.1, alternating. Reads: the same store opened with
``trajlab.open(path_or_url)`` (lazy, dask) and every step array streamed in sample chunks
(``trajlab.analysis.io.map_sample_chunks``), as the analyses read it. moto is a single Python process: this
measures the object-store code path and its per-request overhead, not what a real S3 endpoint sustains.

    python benchmarks/store_throughput.py                  # ~1 min on a 2-core CPU box
    python benchmarks/store_throughput.py --write-samples 128 --reps 3

The last line is the headline: ``ratio: S3 / local write throughput = R``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture_scaling import start_s3, write_store  # noqa: E402


def read_store(path: str) -> float:
    """MB/s of raw step-array data streamed from group ``g`` of ``path`` (local path or URL)."""
    import trajlab
    from trajlab.analysis import io

    t0 = time.perf_counter()
    ds = trajlab.open(path)["g"].to_dataset()
    variables = [v for v in ds.data_vars if "step" in ds[v].dims]
    nbytes = [0]

    def count(chunk):
        nbytes[0] += sum(chunk[v].nbytes for v in variables)
        return chunk[["complete"]] if "complete" in chunk else chunk[[]]

    io.map_sample_chunks(count, ds, variables=variables + ["complete"])
    return nbytes[0] / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="samples per write_samples call")
    ap.add_argument("--reps", type=int, default=2, help="repetitions (alternating local / S3)")
    ap.add_argument("--write-samples", type=int, default=64, help="synthetic samples per measurement")
    ap.add_argument("--write-latent", type=int, default=32, help="latent y = x (4 channels, 5 step variables)")
    args = ap.parse_args()
    import numpy as np

    tmp = tempfile.mkdtemp(prefix="trajlab-throughput-")
    rng = np.random.default_rng(0)
    res = {"local": [], "s3": []}
    server = start_s3()
    try:
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; {args.write_samples} samples x {args.steps} steps x 4x{args.write_latent}x"
              f"{args.write_latent} x 5 step variables (float32, zstd), blocks of {args.batch}", flush=True)
        for rep in range(args.reps):
            for where, path in (("local", f"{tmp}/w-{rep}.zarr"), ("s3", f"s3://bench/w-{rep}.zarr")):
                mb_w, sps = write_store(path, args, rng)
                mb_r = read_store(path)
                res[where].append((mb_w, sps, mb_r))
                print(f"rep {rep} {where}: write {mb_w:.1f} MB/s ({sps:.1f} samples/s), streamed read {mb_r:.1f} MB/s",
                      flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {w: [statistics.median(r[i] for r in rs) for i in range(3)] for w, rs in res.items()}
    for where, label in (("local", "local disk"), ("s3", "S3 (moto on 127.0.0.1)")):
        print(f"{label}: write {med[where][0]:.1f} MB/s ({med[where][1]:.1f} samples/s), "
              f"streamed read {med[where][2]:.1f} MB/s (median of {args.reps})")
    print(f"ratio: S3 / local streamed-read throughput = {med['s3'][2] / med['local'][2]:.2f}x")
    print(f"ratio: S3 / local write throughput = {med['s3'][0] / med['local'][0]:.2f}x")


if __name__ == "__main__":
    main()
