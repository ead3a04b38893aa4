"""Two processes resuming one group take disjoint blocks: a claim per sample block, on a local store.

A capture claims each block it is about to compute with an exclusive POSIX record lock (``fcntl.lockf``) on one
byte of the store's ``.trajlab-claims`` file (at a hash of the group name plus the block's first sample) and
releases it once the writer has marked the block's samples complete. A second process resuming the same group
(the same command run twice, a shard started again while it still runs) skips the blocks another process holds,
captures the others, then waits for each skipped block in turn: complete by then, it is left alone (counted as
captured meanwhile by another process); still incomplete (the other process died: the kernel drops a dead
process's locks), it captures it. Neither process does a block twice and both end with the group complete.

Only where ``fcntl`` record locks exist (a local filesystem; NFS with its lock manager). On an object store
(``s3://``) there is no lock: two processes resuming one group there each compute every block they find
incomplete; split them with ``--shard I/N`` instead. A process that hangs holding a claim keeps the others
waiting for that block; killing it releases the claim.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
import zlib

from trajlab import store


class NoClaims:
    """Where there is no lock (an object store, no ``fcntl``): every block is this process's."""

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


class BlockClaims(NoClaims):
    """Claims on the blocks of group ``group`` of the local store at ``path`` (see the module doc)."""

    _fd = None

    def __init__(self, path, group: str):
        import fcntl

        self._fcntl = fcntl
        root = store.local_path(path)
        os.makedirs(root, exist_ok=True)
        self._fd = os.open(os.path.join(root, store.CLAIMS_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        self._base = zlib.crc32(group.encode()) << 30  # blocks start below 2**30 samples
        self._held: collections.deque = collections.deque()  # in the order the writer commits them
        self._mutex = threading.Lock()
        self.by_others: list[tuple[int, int]] = []
        """Blocks found complete once claimed: another process captured them meanwhile."""

    def _lock(self, start: int, how: int) -> None:
        self._fcntl.lockf(self._fd, how, 1, self._base + start, os.SEEK_SET)

    def try_claim(self, start: int) -> bool:
        """Claim the block starting at sample ``start`` unless another process holds it."""
        try:
            self._lock(start, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        return True

    def wait_claim(self, start: int) -> None:
        """Claim the block starting at ``start``, waiting while another process holds it."""
        while True:
            try:
                self._lock(start, self._fcntl.LOCK_EX)
                return
            except OSError as exc:  # each process waits on the other, whose writer will release: try again
                if exc.errno != errno.EDEADLK:
                    raise
                time.sleep(0.2)

    def _release(self, start: int) -> None:
        self._lock(start, self._fcntl.LOCK_UN)

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
            self.wait_claim(block[0])
            yield from self._take(block, still_todo)

    def _take(self, block, still_todo):
        if still_todo(*block):
            with self._mutex:
                self._held.append(block[0])
            yield block
        else:
            self.by_others.append(block)
            self._release(block[0])

    def committed(self) -> None:
        """The writer committed the oldest yielded block: release its claim (called from the writer thread)."""
        with self._mutex:
            start = self._held.popleft() if self._held else None
        if start is not None:
            self._release(start)

    def close(self) -> None:
        """Release every claim (closing the file drops this process's record locks on it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close  # a capture that failed before closing its claims still releases them


def claims_for(path, group: str):
    """:class:`BlockClaims` for a local store where ``fcntl`` exists, else :class:`NoClaims`."""
    if not store.is_local(path):
        return NoClaims()
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - Windows
        return NoClaims()
    return BlockClaims(path, group)


__all__ = ["BlockClaims", "NoClaims", "claims_for"]
