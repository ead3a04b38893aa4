"""Two processes resuming one group coordinate (issue 20 item 2): each sample block is claimed with a record
lock (trajlab.capture.claims), so a second capture skips the blocks another process holds, captures the
others, then waits for each held block: complete by then, it is counted as captured by the other process;
left incomplete (the other process died), it captures it. No block is done twice; the store equals a
one-process capture."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trajlab import store
from trajlab.capture import claims as C
from trajlab.capture.claims import BlockClaims, NoClaims, ObjectClaims, claims_for
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import _env, assert_same_store, s3_server  # noqa: E402,F401

ARGS = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:4", "--batch-size", "1", "--group", "g"]
N = 8

HOLDER = """
import sys, time
from trajlab import store
from trajlab.capture import claims as C
path, ref, starts, mode = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")], sys.argv[4]
C.HEARTBEAT_S = 0.3
claims = C.claims_for(path, "g")
assert all(claims.try_claim(s) for s in starts)
print("held", flush=True)
sys.stdin.readline()
if mode == "write":  # what another process capturing these blocks writes
    ds = store.open_group(ref, "g").load()
    for s in starts:
        store.write_samples(path, "g", s, {v: ds[v].values[s:s + 1] for v in ds[store.CHECKSUM].attrs["variables"]})
        store.mark_complete(path, "g", s, s + 1)
    claims.close()
print("done", flush=True)
if mode == "hang":  # alive and holding (heartbeat included), never completing
    time.sleep(3600)
"""


def _holder(path, ref, starts, mode, env=None):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ref), ",".join(map(str, starts)), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(**(env or {})))
    assert p.stdout.readline().strip() == "held", p.stderr.read()
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_a_claim_excludes_other_processes_only(tmp_path):
    path = tmp_path / "s.zarr"
    holder = _holder(path, path, [0, 4], "exit")
    mine = BlockClaims(path, "g")
    try:
        assert not mine.try_claim(0) and not mine.try_claim(4), "held by the other process"
        assert mine.try_claim(1) and BlockClaims(path, "h").try_claim(0), "other blocks, other groups are free"
        holder.stdin.write("\n")
        holder.stdin.flush()
        mine.wait_claim(0)  # returns once the holder has exited
        assert holder.wait(timeout=60) == 0
    finally:
        mine.close()
        holder.kill()
    assert isinstance(claims_for("gs://bucket/x.zarr", "g"), NoClaims)  # no conditional writes known there


def _capture_in_thread(path, capsys):
    result = {}
    t = threading.Thread(target=lambda: result.update(code=main([*ARGS, "--out", str(path)])))
    t.start()
    return t, result


def _wait_for(cond, what, timeout=600):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _done(path):
    try:
        return store.completed(path, "g")
    except Exception:  # noqa: BLE001 - not allocated yet
        return None


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("holder_mode", ["write", "exit", "hang"],
                         ids=["other-completes-them", "other-dies", "other-hangs"])
def test_a_capture_takes_the_blocks_no_other_process_holds_then_waits(reference, tmp_path, capsys, holder_mode, where,
                                                                      request, monkeypatch):
    env = request.getfixturevalue("s3_server") if where == "s3" else {}
    path = "s3://trajlab/s.zarr" if where == "s3" else tmp_path / "s.zarr"
    monkeypatch.setattr(C, "STALE_S", 2.0)  # a dead holder's claim object: taken over after 2 s unchanged
    monkeypatch.setattr(C, "HUNG_MIN_S", (10.0 if where == "s3" else 4.0) if holder_mode == "hang" else 600.0)
    held = [0, 5]
    holder = _holder(path, reference, held, holder_mode, env)
    try:
        t, result = _capture_in_thread(path, capsys)
        free = [s for s in range(N) if s not in held]
        _wait_for(lambda: (d := _done(path)) is not None and d[free].all(), "the free blocks were not captured")
        time.sleep(1.0)
        assert not _done(path)[held].any(), "a block another process holds was captured"
        assert t.is_alive(), "the capture waits for the held blocks"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done", holder.stderr.read()
        t.join(timeout=600)
    finally:
        holder.kill()
    assert result.get("code") == 0
    captured = capsys.readouterr()
    out = captured.out
    if holder_mode == "write":
        assert f"captured {N - len(held)} samples (0 already complete; {len(held)} captured meanwhile by another " \
               "process)" in out, out
        assert f"group g: complete ({N}/{N} samples)" in out, out
    else:
        assert f"captured {N} samples (0 already complete)" in out, out
    hung = [x for x in captured.err.splitlines() if "without being completed" in x]
    assert len(hung) == (len(held) if holder_mode == "hang" else 0), captured.err
    if holder_mode == "hang":
        assert "samples 0-0 of group g: held by another process for " in hung[0], hung
    assert_same_store(reference, path)


def test_object_store_claims_exclude_each_other_and_a_dead_holder_is_taken_over_once(s3_server, monkeypatch):
    """Three claimants on one block of an S3 store: one holds it while it beats; once it stops, exactly one of the
    two waiters takes it over (conditional overwrite), and a released claim is free again."""
    monkeypatch.setattr(C, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(C, "STALE_S", 1.0)
    url = "s3://trajlab/c.zarr"
    a, b, c = (ObjectClaims(url, "g") for _ in range(3))
    try:
        assert a.try_claim(0) and not b.try_claim(0) and not c.try_claim(0)
        assert ObjectClaims(url, "h").try_claim(0) and b.try_claim(1), "other groups, other blocks are free"
        time.sleep(1.5)  # a beats: its claim object changes, so it never looks dead
        assert not b.try_claim(0) and not c.try_claim(0)
        a._stop.set()  # a dies: no more beats, its claim object stays
        time.sleep(0.5)
        b.try_claim(0), c.try_claim(0)  # each sees the last ETag
        time.sleep(1.2)
        won = [b.try_claim(0), c.try_claim(0)]
        assert sorted(won) == [False, True], won
        winner = b if won[0] else c
        winner._release(0)
        assert a.try_claim(0), "a released claim is free"
    finally:
        for x in (a, b, c):
            x.close()


def test_two_processes_resuming_one_group_do_each_block_once(reference, tmp_path):
    path = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "trajlab", *ARGS, "--out", str(path)]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    written = []
    for out, _ in outs:
        line = next(x for x in out.splitlines() if x.startswith("captured "))
        written.append(int(line.split()[1]))
    assert sum(written) == N, outs  # never both: each block by one process
    assert_same_store(reference, path)
    assert os.path.exists(path / store.CLAIMS_FILE)


def test_the_demo_captures_with_two_processes_into_the_one_process_store(reference, tmp_path, capsys, monkeypatch):
    """capture_together: a helper process runs the plans in reverse order; claims split the blocks; the store is
    the one-process store (every chunk byte), and the helper really captured some of it."""
    from trajlab.experiments import plans as P
    from trajlab.experiments.demo import capture_together

    seen = []
    with monkeypatch.context() as m:  # the CLI's plans of ARGS, not run
        m.setattr(P, "run_plans", lambda plans, out, **kw: seen.extend(plans))
        assert main([*ARGS, "--out", str(tmp_path / "unused.zarr")]) == 0
    out = str(tmp_path / "two.zarr")
    real = P.run_plans

    def after_the_helper_began(plans, path, **kw):  # the helper imports for seconds; tiny-sd captures in one
        t0 = time.time()
        while True:
            try:
                if store.completed(path, "g").any():
                    break
            except (KeyError, FileNotFoundError, store.StoreError):  # not allocated, or being allocated
                pass
            assert time.time() - t0 < 300, "the helper process captured nothing in 300 s"
            time.sleep(0.05)
        return real(plans, path, **kw)

    monkeypatch.setattr(P, "run_plans", after_the_helper_began)
    capsys.readouterr()
    capture_together(seen, out, processes=2, progress=False)
    assert_same_store(reference, Path(out))
    helper = Path(f"{out}.helper-1.log").read_text()
    theirs = next(x for x in helper.splitlines() if x.startswith("captured "))
    mine = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("captured "))
    assert int(theirs.split()[1]) + int(mine.split()[1]) == N and int(theirs.split()[1]) > 0, (theirs, mine)
