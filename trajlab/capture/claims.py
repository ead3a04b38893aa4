"""Two processes resuming one group take disjoint blocks: a claim per sample block, on a local store or an
object store.

A capture claims each block it is about to compute and releases the claim once the writer has marked the
block's samples complete. A second process resuming the same group (the same command run twice, a shard started
again while it still runs) skips the blocks another process holds, captures the others, then waits for each
skipped block in turn: complete by then, it is left alone (counted as captured meanwhile by another process);
still incomplete (the other process died), it captures it. Neither process does a block twice and both end with
the group complete.

- **Local store** (:class:`BlockClaims`): an exclusive POSIX record lock (``fcntl.lockf``) on one byte of the
  store's ``.trajlab-claims`` file (at a hash of the group name plus the block's first sample); the kernel drops
  a dead process's locks.
- **Object store** (:class:`ObjectClaims`, ``s3://``): one object per held block under ``.trajlab-claims/<group>/``,
  created only if absent (S3 conditional write, ``If-None-Match: *``), rewritten by a heartbeat thread every
  :data:`HEARTBEAT_S` seconds and deleted once committed. A claim whose object has not changed for
  :data:`STALE_S` seconds belongs to a dead process: a waiter takes it over with a conditional overwrite
  (``If-Match`` its last ETag), so of several waiters one wins.
- **A holder that hangs** (alive, holding, never completing): a waiter gives up waiting after
  :func:`hung_after` seconds (at least :data:`HUNG_MIN_S`, or :data:`HUNG_FACTOR` x the slowest block this
  process captured), prints one line naming the samples, and captures the block itself. Capture is
  deterministic, so both processes write the same values; the work is done twice, nothing is lost.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import sys
import threading
import time
import uuid
import zlib

from trajlab import store
from trajlab.store_fs import url_fs

HEARTBEAT_S = 5.0
"""Seconds between the rewrites of an object-store claim by its holder."""
STALE_S = 30.0
"""An object-store claim unchanged for this long (6 missed heartbeats) is a dead process's: taken over."""
HUNG_MIN_S = 300.0
"""A waiter waits at least this long for a block another process holds before capturing it itself."""
HUNG_FACTOR = 10.0
"""... or this many times the slowest block this process captured, when that is longer."""
POLL_S = 0.2


class NoClaims:
    """Where there is no lock (no ``fcntl``, no conditional writes): every block is this process's."""

    by_others: list = []

    def blocks(self, todo, still_todo):
        yield from todo

    def committed(self) -> None:
        pass

    def releasing(self, then=None):
        """The writer's ``on_batch_written``: release the committed block's claim, then ``then(n_samples)``."""
        def on_batch_written(n):
            self.committed()
            if then is not None:
                then(n)

        return on_batch_written

    def close(self) -> None:
        pass


class _Claims(NoClaims):
    """The protocol shared by both kinds of claim; a subclass says how to try, wait for and release one."""

    def __init__(self, group: str):
        self.group = group
        self._held: collections.deque = collections.deque()  # (start, time claimed), in the writer's order
        self._mutex = threading.Lock()
        self._slowest = 0.0
        self.by_others: list[tuple[int, int]] = []
        """Blocks found complete once claimed: another process captured them meanwhile."""
        self.taken_from_hung: list[tuple[int, int]] = []
        """Blocks another process held past :func:`hung_after` without completing them: captured here too."""

    def try_claim(self, start: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _release(self, start: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def hung_after(self) -> float:
        """Seconds a waiter waits for a held block before capturing it itself."""
        return max(HUNG_MIN_S, HUNG_FACTOR * self._slowest)

    def wait_claim(self, start: int, timeout: float | None = None) -> bool:
        """Claim the block starting at ``start``, waiting while another process holds it; False if it was still
        held after ``timeout`` seconds (default :meth:`hung_after`)."""
        deadline = time.monotonic() + (self.hung_after() if timeout is None else timeout)
        while not self.try_claim(start):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def blocks(self, todo, still_todo):
        """Yield the blocks ``(start, stop)`` of ``todo`` to capture, claimed: first those no other process holds,
        then, waiting for each, those another process held and left incomplete. ``still_todo(start, stop)``
        re-reads whether a claimed block still needs capturing. A yielded block's claim is released once the
        writer has committed it (:meth:`committed`, in the order blocks were yielded)."""
        later = []
        for block in todo:
            if self.try_claim(block[0]):
                yield from self._take(block, still_todo)
            else:
                later.append(block)
        for block in later:
            waited = time.monotonic()
            if self.wait_claim(block[0]):
                yield from self._take(block, still_todo)
            elif still_todo(*block):  # the holder is alive but makes no progress: capture it here as well
                print(f"note: samples {block[0]}-{block[1] - 1} of group {self.group}: held by another process for "
                      f"{time.monotonic() - waited:.0f} s without being completed; capturing them here too (the same "
                      f"values either way)", file=sys.stderr, flush=True)
                self.taken_from_hung.append(block)
                with self._mutex:
                    self._held.append((None, time.monotonic()))
                yield block
            else:
                self.by_others.append(block)

    def _take(self, block, still_todo):
        if still_todo(*block):
            with self._mutex:
                self._held.append((block[0], time.monotonic()))
            yield block
        else:
            self.by_others.append(block)
            self._release(block[0])

    def committed(self) -> None:
        """The writer committed the oldest yielded block: release its claim (called from the writer thread)."""
        with self._mutex:
            start, since = self._held.popleft() if self._held else (None, None)
            if since is not None:
                self._slowest = max(self._slowest, time.monotonic() - since)
        if start is not None:
            self._release(start)


class BlockClaims(_Claims):
    """Record-lock claims on the blocks of group ``group`` of the local store at ``path`` (see the module doc)."""

    _fd = None

    def __init__(self, path, group: str):
        import fcntl

        super().__init__(group)
        self._fcntl = fcntl
        root = store.local_path(path)
        os.makedirs(root, exist_ok=True)
        self._fd = os.open(os.path.join(root, store.CLAIMS_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        self._base = zlib.crc32(group.encode()) << 30  # blocks start below 2**30 samples

    def _lock(self, start: int, how: int) -> None:
        self._fcntl.lockf(self._fd, how, 1, self._base + start, os.SEEK_SET)

    def try_claim(self, start: int) -> bool:
        """Claim the block starting at sample ``start`` unless another process holds it."""
        try:
            self._lock(start, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EDEADLK):
                return False
            raise
        return True

    def _release(self, start: int) -> None:
        self._lock(start, self._fcntl.LOCK_UN)

    def close(self) -> None:
        """Release every claim (closing the file drops this process's record locks on it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close  # a capture that failed before closing its claims still releases them


class ObjectClaims(_Claims):
    """Claim objects on the blocks of group ``group`` of the object store at ``path`` (see the module doc)."""

    def __init__(self, path, group: str):
        super().__init__(group)
        self._fs, inner = url_fs(path)
        self._prefix = f"{inner}/{store.CLAIMS_FILE}/{group}"
        self._me = uuid.uuid4().hex
        self._etags: dict[int, str] = {}  # the blocks this process holds -> its claim object's last ETag
        self._seen: dict[int, tuple[str, float]] = {}  # another's claim -> (ETag, when this process first saw it)
        self._beats = 0
        self._stop = threading.Event()
        self._heart = threading.Thread(target=self._heartbeat, name=f"claims-{group}", daemon=True)
        self._heart.start()

    def _key(self, start: int) -> str:
        return f"{self._prefix}/{start}"

    def _body(self) -> bytes:
        self._beats += 1
        return json.dumps({"holder": self._me, "pid": os.getpid(), "beat": self._beats}).encode()

    def _put(self, start: int, **cond) -> bool:
        try:
            out = self._fs.pipe_file(self._key(start), self._body(), **cond)
        except (FileExistsError, FileNotFoundError):  # held by another / released meanwhile (If-Match)
            return False
        except OSError as exc:  # 412 Precondition Failed on If-Match: another process took it over first
            if exc.errno == errno.EINVAL or "PreconditionFailed" in str(exc):
                return False
            raise
        etag = out.get("ETag") if isinstance(out, dict) else None
        self._etags[start] = etag or self._fs.info(self._key(start), refresh=True)["ETag"]
        return True

    def try_claim(self, start: int) -> bool:
        """Create the block's claim object if absent; else take it over if it has been unchanged for STALE_S."""
        if self._put(start, mode="create"):
            return True
        try:
            etag = self._fs.info(self._key(start), refresh=True)["ETag"]
        except FileNotFoundError:  # released meanwhile: the next try creates it
            return False
        seen = self._seen.get(start)
        if seen is None or seen[0] != etag:
            self._seen[start] = (etag, time.monotonic())
            return False
        if time.monotonic() - seen[1] < STALE_S:
            return False
        return self._put(start, IfMatch=etag)  # its holder stopped beating: it died

    def _release(self, start: int) -> None:
        self._etags.pop(start, None)
        try:
            self._fs.rm_file(self._key(start))
        except FileNotFoundError:
            pass

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for start, etag in list(self._etags.items()):
                try:
                    if not self._put(start, IfMatch=etag):  # taken over (this process looked dead): let it go
                        self._etags.pop(start, None)
                except Exception:  # noqa: BLE001 - a lost beat; the next one tries again
                    pass

    def close(self) -> None:
        """Stop the heartbeat and delete this process's remaining claims."""
        self._stop.set()
        for start in list(self._etags):
            self._release(start)


def claims_for(path, group: str):
    """:class:`BlockClaims` for a local store where ``fcntl`` exists, :class:`ObjectClaims` for an ``s3://``
    store, else :class:`NoClaims`."""
    if not store.is_local(path):
        return ObjectClaims(path, group) if str(path).startswith("s3://") else NoClaims()
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        return NoClaims()
    return BlockClaims(path, group)


__all__ = ["BlockClaims", "HEARTBEAT_S", "HUNG_FACTOR", "HUNG_MIN_S", "NoClaims", "ObjectClaims", "STALE_S",
           "claims_for"]
