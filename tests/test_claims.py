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
from trajlab.capture.claims import BlockClaims, NoClaims, claims_for
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import _env, assert_same_store  # noqa: E402

ARGS = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:4", "--batch-size", "1", "--group", "g"]
N = 8

HOLDER = """
import sys
from trajlab import store
from trajlab.capture.claims import BlockClaims
path, ref, starts, mode = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")], sys.argv[4]
claims = BlockClaims(path, "g")
assert all(claims.try_claim(s) for s in starts)
print("held", flush=True)
sys.stdin.readline()
if mode == "write":  # what another process capturing these blocks writes
    ds = store.open_group(ref, "g").load()
    for s in starts:
        store.write_samples(path, "g", s, {v: ds[v].values[s:s + 1] for v in ds[store.CHECKSUM].attrs["variables"]})
        store.mark_complete(path, "g", s, s + 1)
print("done", flush=True)
"""


def _holder(path, ref, starts, mode):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(ref), ",".join(map(str, starts)), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
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
    assert isinstance(claims_for("s3://bucket/x.zarr", "g"), NoClaims)


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


@pytest.mark.parametrize("holder_mode", ["write", "exit"], ids=["other-completes-them", "other-dies"])
def test_a_capture_takes_the_blocks_no_other_process_holds_then_waits(reference, tmp_path, capsys, holder_mode):
    path = tmp_path / "s.zarr"
    held = [0, 5]
    holder = _holder(path, reference, held, holder_mode)
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
    out = capsys.readouterr().out
    if holder_mode == "write":
        assert f"captured {N - len(held)} samples (0 already complete; {len(held)} captured meanwhile by another " \
               "process)" in out, out
        assert f"group g: complete ({N}/{N} samples)" in out, out
    else:
        assert f"captured {N} samples (0 already complete)" in out, out
    assert_same_store(reference, path)


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
