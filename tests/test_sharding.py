"""Sharded capture: --shard I/N and torchrun ranks write one store bitwise equal to a one-process capture;
a killed shard resumes only its own incomplete samples; two shards write one S3 (moto) store."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from trajlab import store
from trajlab.capture.shard import Shard, ShardError, check, parse_shard
from trajlab.cli import main

TINY = ["--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet"]
ARGS = ["capture", *TINY, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:8", "--batch-size", "2",
        "--group", "g"]
N_SAMPLES, BATCH = 16, 2
SHARD1_SAMPLES = [s for b in range(1, N_SAMPLES // BATCH, 2) for s in range(b * BATCH, (b + 1) * BATCH)]


def _env(**extra):
    """Subprocesses use this process's thread count: bitwise comparisons need the same reduction order."""
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _popen(args, env=None):
    return subprocess.Popen([sys.executable, *args], env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=600):  # generous: two processes import torch + diffusers on 2 shared cores
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def assert_same_store(ref, other, group="g"):
    """Every variable and coordinate bitwise equal, attrs equal but for the creation time and the group's place in
    its store's list (``list_position``: a reference store may hold fewer groups); `other` valid."""
    store.validate(other)
    assert group in store.open(other).children
    a = store.open_group(ref, group).load()
    b = store.open_group(other, group).load()
    assert bool(b.complete.all())
    assert set(a.variables) == set(b.variables)
    for var in a.variables:
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    skip = ("created", store.LIST_POSITION)
    assert {k: v for k, v in a.attrs.items() if k not in skip} == {k: v for k, v in b.attrs.items() if k not in skip}
    if store.is_local(other):  # the files themselves: every chunk and array metadata byte for byte
        # a killed writer may leave zarr's atomic-write temp file (*.partial) behind; it is never read
        def chunk_files(root):
            return {p.relative_to(root): p.read_bytes() for p in root.rglob("*")
                    if p.is_file() and not p.name.endswith(".partial")}

        files, others = chunk_files(ref / group), chunk_files(other / group)
        assert set(files) == set(others)
        differ = [str(k) for k in files if files[k] != others[k] and str(k) != "zarr.json"]  # group attrs: `created`
        assert not differ, differ


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process capture of ARGS."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


# -- assignment and argument checks (no models) ---------------------------------------------------------
def test_block_assignment_is_round_robin_over_batch_blocks():
    assert Shard(0, 2).block_starts(16, 2) == [0, 4, 8, 12]
    assert Shard(1, 2).block_starts(16, 2) == [2, 6, 10, 14]
    assert Shard(2, 3).block_starts(7, 2) == [4]  # blocks 0..3 start at 0, 2, 4, 6; block 2 -> shard 2
    starts = sorted(s for i in range(3) for s in Shard(i, 3).block_starts(17, 4))
    assert starts == list(range(0, 17, 4)), "every block exactly once"
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard(None) is None
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ShardError, match="expected I/N"):
            parse_shard(bad)


def test_shard_and_torchrun_together_are_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check(None) == Shard(1, 2)
    with pytest.raises(ShardError, match="use one or the other"):
        check("0/2")
    assert main([*ARGS, "--shard", "0/2", "--out", str(tmp_path / "s.zarr")]) == 2
    assert "use one or the other" in capsys.readouterr().err
    assert not (tmp_path / "s.zarr").exists()


# -- end to end -------------------------------------------------------------------------------------------
def test_two_shards_in_one_process_equal_one_process(reference, tmp_path, capsys):
    """Shard 1 runs first (it allocates the group under the lock), shard 0 second; the reference ran whole."""
    out = tmp_path / "s.zarr"
    assert main([*ARGS, "--shard", "1/2", "--out", str(out)]) == 0
    assert "captured 8 samples (0 already complete)" in capsys.readouterr().out
    done = store.completed(out, "g")
    assert done[SHARD1_SAMPLES].all() and done.sum() == len(SHARD1_SAMPLES)
    store.validate(out)  # a partly written sharded store is a valid store
    assert main([*ARGS, "--shard", "0/2", "--out", str(out)]) == 0
    assert "captured 8 samples (0 already complete)" in capsys.readouterr().out
    assert_same_store(reference, out)


def test_torchrun_two_ranks_equal_one_process(reference, tmp_path):
    out = tmp_path / "t.zarr"
    proc = _popen(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "-m", "trajlab", *ARGS, "--out", str(out)])
    stdout = _finish(proc)
    assert stdout.count("captured 8 samples (0 already complete)") == 2, stdout
    assert_same_store(reference, out)


def test_kill_one_shard_and_rerun_it_redoes_only_its_incomplete_samples(reference, tmp_path, capsys):
    out = tmp_path / "k.zarr"
    p1 = subprocess.Popen([sys.executable, "-m", "trajlab", *ARGS, "--shard", "1/2", "--out", str(out)],
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p0 = _popen(["-m", "trajlab", *ARGS, "--shard", "0/2", "--out", str(out)])
    deadline = time.time() + 240
    while time.time() < deadline and p1.poll() is None:
        try:
            n = int(store.completed(out, "g")[SHARD1_SAMPLES].sum())
        except Exception:
            n = 0
        if n >= 2:
            break
        time.sleep(0.02)
    p1.send_signal(signal.SIGKILL)
    p1.communicate(timeout=60)
    _finish(p0)
    done = store.completed(out, "g")
    mine = done[SHARD1_SAMPLES]
    others = np.delete(done, SHARD1_SAMPLES)
    assert others.all(), "shard 0 is unaffected by shard 1's death"
    assert 2 <= mine.sum() < len(SHARD1_SAMPLES), f"the kill should land mid-run; {mine.sum()} samples were complete"
    capsys.readouterr()
    assert main([*ARGS, "--shard", "1/2", "--out", str(out)]) == 0
    n_done = int(mine.sum())
    assert f"captured {len(SHARD1_SAMPLES) - n_done} samples ({n_done} already complete)" in capsys.readouterr().out
    assert_same_store(reference, out)


@pytest.fixture
def s3_server(monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket ``trajlab``; this process's env points s3fs at it."""
    import logging

    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("trajlab"):  # moto's backend is per process: a bucket outlives the server that made it
        fs.rm("trajlab", recursive=True)
    fs.mkdir("trajlab")
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_two_concurrent_shards_into_s3_equal_local_one_process(reference, s3_server):
    url = "s3://trajlab/study.zarr"
    env = _env(**s3_server, TRAJLAB_SHARD_WAIT_S="240")
    p1 = _popen(["-m", "trajlab", *ARGS, "--shard", "1/2", "--out", url], env=env)  # waits for shard 0 to allocate
    p0 = _popen(["-m", "trajlab", *ARGS, "--shard", "0/2", "--out", url], env=env)
    for p in (p0, p1):
        assert "captured 8 samples (0 already complete)" in _finish(p)
    import s3fs

    fs = s3fs.S3FileSystem()
    assert not fs.exists("trajlab/study.zarr/.trajlab-lock"), "no lock file on an object store"
    assert store.group_names(url) == ["g"] and not store.consolidated_is_stale(url)
    assert_same_store(reference, url)
    assert store.summary(url)[0]["bytes"] > 0
