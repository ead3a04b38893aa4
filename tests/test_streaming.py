"""Analyses larger than memory: lazy stores, results streamed over sample chunks equal to the in-memory path,
a peak-memory bound on a store several times larger than it, and the same results on a dask cluster."""

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trajlab
from trajlab.analysis import io
from trajlab.analysis import results as R
from trajlab.analysis.cluster import ClusterError, check_address

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_store import build_store, can_measure, measure, step_bytes  # noqa: E402

NO_SCORERS = (None, None, None, [])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("streaming") / "small.zarr"
    return path, build_store(path)


def _assert_same_results(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        da, db = (a[name], b[name]) if isinstance(a[name], dict) else ({"": a[name]}, {"": b[name]})
        assert set(da) == set(db), name
        for key in da:
            try:
                xr.testing.assert_identical(da[key], db[key])
            except AssertionError as exc:
                raise AssertionError(f"result {name} {key}: streamed differs from in-memory\n{exc}") from None


def _assert_same_files(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in a.rglob("*.nc"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.nc")) and len(fa) > 10
    for rel in fa:
        with xr.open_dataset(a / rel) as x, xr.open_dataset(b / rel) as y:
            xr.testing.assert_identical(x.load(), y.load())


@pytest.mark.filterwarnings("ignore:The specified chunks separate")  # the (sample,) coords are stored in one chunk
def test_open_is_lazy_and_chunked_along_sample(small):
    path, _ = small
    tree = trajlab.open(path)
    ds = tree["teacher"].to_dataset()
    for v in ("latent", "x0_pred", "model_output", "final_latent", "image"):
        chunks = ds[v].variable.chunks
        assert chunks is not None, f"{v} is loaded into memory"
        assert set(chunks[0]) == {1}, f"{v} sample chunks {chunks[0]}"           # one sample per chunk
        assert all(len(c) == 1 for c in chunks[1:]), f"{v} chunks {chunks}"      # all steps, whole latents
    coarse = trajlab.open(path, chunks={"sample": 8})["teacher"].to_dataset()
    assert coarse["x0_pred"].variable.chunks[0] == (8, 8, 8, 8)
    groups = io.open_groups(path)
    assert isinstance(groups["student"]["complete"].data, np.ndarray)  # read once: every analysis asks for it
    assert groups["student"]["x0_pred"].variable.chunks is not None


def test_map_sample_chunks_bounds_the_chunk_and_equals_one_pass(small):
    path, _ = small
    ds = io.open_groups(path)["teacher"]
    per_sample = 8 * int(np.prod(ds["x0_pred"].shape[1:]))
    assert io.samples_per_chunk(ds, ["x0_pred"], budget=3 * per_sample) == 3
    assert io.samples_per_chunk(ds, ["x0_pred"], budget=1) == 1
    seen = []

    def norms(chunk, record=True):
        assert isinstance(chunk["x0_pred"].data, np.ndarray) and "latent" not in chunk
        if record:
            seen.append(chunk.sizes["sample"])
        x = chunk["x0_pred"].values.astype(np.float64)
        return xr.Dataset({"norm": (("sample", "step"), np.sqrt((x ** 2).sum(axis=(2, 3, 4))))},
                          coords={"seed": chunk["seed"]})

    idx = np.arange(1, ds.sizes["sample"], 2)
    out = io.map_sample_chunks(norms, ds, idx, variables=["x0_pred"], budget=3 * per_sample)
    assert seen == [3] * 5 + [1]
    xr.testing.assert_identical(out, norms(io.only(ds, ["x0_pred"]).isel(sample=idx).load(), record=False))


def test_streamed_results_equal_in_memory(small, monkeypatch):
    path, expected = small
    in_memory = R.compute_all(path, scorers=NO_SCORERS, lpips=False, n_boot=20, in_memory=True)
    monkeypatch.setattr(io, "CHUNK_BYTES", 1)            # one sample per chunk everywhere
    monkeypatch.setattr(R, "SAMPLE_CACHE_BYTES", 0)      # per-sample outputs stay lazy too
    streamed = R.compute_all(path, scorers=NO_SCORERS, lpips=False, n_boot=20)
    _assert_same_results(streamed, in_memory)
    commit = streamed["commitment"]
    assert commit.sizes["group"] == 3 and set(streamed["coverage"]["group"].values) == {"student"}
    # the synthetic x0 paths commit at step s % n_step by construction (first COMMIT_MAX_SAMPLES complete samples)
    for g in ("teacher", "teacher_short"):
        want = np.median(expected[g][: R.COMMIT_MAX_SAMPLES])
        assert float(commit["median_commit_step"].sel(group=g)) == want


@pytest.mark.skipif(not can_measure(), reason="needs Linux /proc/self/status and clear_refs")
def test_results_of_a_store_larger_than_the_allowed_memory(small, tmp_path):
    """The (sample, step, ...) arrays of the big store are ~0.9 GiB; computing (and writing) every result
    may grow the process by at most a quarter of that (the in-memory path grows by more than the store)."""
    big = tmp_path / "big.zarr"
    shape = dict(n_prompts=4, n_seeds=32, latent=(4, 32, 32), steps=(96, 8))
    expected = build_store(big, **shape)
    allowed_mb = step_bytes(**shape) / 2**20 / 4
    tiny = tmp_path / "tiny.zarr"
    build_store(tiny, n_prompts=2, n_seeds=6, steps=(4, 2))
    (run,) = measure([big], tiny, tmp_path / "out")
    assert run["growth_mb"] < allowed_mb, (f"computing results grew the process by {run['growth_mb']:.0f} MiB; "
                                           f"allowed {allowed_mb:.0f} MiB (store step arrays x 1/4)")
    with xr.open_dataset(Path(run["results"]) / "commitment.nc") as c:
        for g, n_step in (("teacher", 96), ("teacher_short", 48), ("student", 8)):
            assert float(c["median_commit_step"].sel(group=g)) == np.median(expected[g][: R.COMMIT_MAX_SAMPLES])
            assert int(c["n_step"].sel(group=g)) == n_step
    with xr.open_dataset(Path(run["results"]) / "coverage.nc") as cov:
        assert list(cov["group"].values) == ["student"] and 0 < float(cov["coverage"][0]) <= 1


def test_check_address():
    assert check_address("10.0.0.5:8786") == "tcp://10.0.0.5:8786"
    assert check_address("tls://sched.example:8786") == "tls://sched.example:8786"
    for bad in ("sched", "http//x:1", "tcp://host:", "tcp://host:99999", "tcp://a b:1"):
        with pytest.raises(ClusterError, match="scheduler address"):
            check_address(bad)


def test_report_cli_checks_cluster_options_first(small, tmp_path, capsys, monkeypatch):
    from trajlab import cli
    from trajlab.analysis import cluster

    path, _ = small
    out = tmp_path / "r"
    assert cli.main(["report", str(path), "--out", str(out), "--scheduler", "nohost"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert cli.main(["report", str(path), "--out", str(out), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    assert cli.main(["report", str(path), "--out", str(out), "--workers", "2", "--scheduler", "x:1"]) == 2
    assert "not both" in capsys.readouterr().err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 1.0)
    assert cli.main(["report", str(path), "--out", str(out), "--scheduler", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot connect" in err and "Connection refused" in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing computed


def test_report_with_workers_equals_default_scheduler(tmp_path):
    pytest.importorskip("distributed")
    from trajlab import cli

    tiny = tmp_path / "tiny.zarr"
    build_store(tiny, n_prompts=2, n_seeds=6, steps=(4, 2))
    from trajlab.experiments.configs import CALIBRATION_FILE, prompt_tags, store_margins

    # what `trajlab report` computes, on dask's default scheduler in this process (no rendering)
    ref = R.compute_results(tiny, tmp_path / "ref", lpips=False, n_boot=20, tags=prompt_tags(),
                            calibration=CALIBRATION_FILE, margins=store_margins(tiny))
    assert cli.main(["report", str(tiny), "--out", str(tmp_path / "cluster"), "--workers", "2", "--no-lpips",
                     "--n-boot", "20"]) == 0
    assert (tmp_path / "cluster" / "index.html").is_file()
    _assert_same_files(ref, tmp_path / "cluster" / R.RESULTS_DIR)


def test_a_worker_killed_mid_report_is_one_line_and_changes_nothing(tmp_path, capfd):
    """A dask worker process SIGKILLed while the report's analyses run on a 2-worker LocalCluster: the results are
    those of dask's default scheduler, and the restart is one line on stderr, no traceback."""
    pytest.importorskip("distributed")
    import os
    import signal
    import threading
    import time

    from trajlab.analysis.cluster import dask_cluster
    from trajlab.experiments.configs import CALIBRATION_FILE, prompt_tags, store_margins

    tiny = tmp_path / "tiny.zarr"
    build_store(tiny, n_prompts=2, n_seeds=6, steps=(4, 2))
    kw = dict(lpips=False, n_boot=20, tags=prompt_tags(), calibration=CALIBRATION_FILE, margins=store_margins(tiny))
    ref = R.compute_results(tiny, tmp_path / "ref", **kw)
    capfd.readouterr()
    with dask_cluster(workers=2) as client:
        victim = next(iter(client.run(os.getpid).values()))
        killer = threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        got = R.compute_results(tiny, tmp_path / "cluster", **kw)
        killer.join()
        assert time.monotonic() - t0 > 1.0, "the report ended before the worker was killed: not a mid-report kill"
    err = capfd.readouterr().err
    _assert_same_files(ref, got)
    lines = [x for x in err.splitlines() if x.startswith("dask: ")]
    assert len(lines) == 1 and "1 worker process(es) died during the analyses" in lines[0], err
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture
def s3_url(monkeypatch):
    """A bucket on a moto S3 server on 127.0.0.1 (this process's env points s3fs at it); yields its URL."""
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("streaming"):  # moto's backend is per process: a bucket outlives the server that made it
        fs.rm("streaming", recursive=True)
    fs.mkdir("streaming")
    try:
        yield "s3://streaming"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_open_by_url_streams_like_a_local_store(s3_url, tmp_path):
    shape = dict(n_prompts=2, n_seeds=3, steps=(4, 2))
    build_store(tmp_path / "local.zarr", **shape)
    build_store(f"{s3_url}/remote.zarr", **shape)
    remote = io.open_groups(f"{s3_url}/remote.zarr")["teacher"]
    local = io.open_groups(tmp_path / "local.zarr")["teacher"]
    assert remote["x0_pred"].variable.chunks[0] == (1,) * 6  # lazy over the URL too
    keep = ["x0_pred", "final_latent", "image"]
    a = io.map_sample_chunks(lambda c: c, remote, variables=keep, budget=1)
    b = io.map_sample_chunks(lambda c: c, local, variables=keep, budget=1)
    xr.testing.assert_identical(a, b)
    assert np.isfinite(a["x0_pred"].values).all()
