"""Splitting one capture across processes: ``--shard I/N``, torchrun ranks, one object store.

**Assignment (fixed, documented).** A plan's samples, prompt-major (sample = prompt_index * n_seeds +
seed_index), are cut into blocks of ``batch_size`` exactly as a single process cuts them; block ``b``
(samples ``[b * batch_size, (b + 1) * batch_size)``) belongs to shard ``b % N``. Every sample is
computed in the same batch, with the same seeds, as in a single-process run, so the store is bitwise
identical to one written by one process (given the same torch thread count: reductions follow it).

**Who allocates a group.** Shapes and the step grid come from the first batch a process runs, so the
group is allocated lazily, by the writer, before its first write:

* ``--shard I/N`` on a local store (path or ``file://``): any shard allocates, under the store's
  ``flock`` metadata lock; a shard that finds the group already there checks its config instead.
* ``--shard I/N`` on an object store (``s3://``...; no lock): only shard 0 allocates; the others
  compute their first batch meanwhile and wait (``TRAJLAB_SHARD_WAIT_S``, default 3600 s) for the
  group to appear before writing, then check its config.
* torchrun (``RANK`` / ``WORLD_SIZE`` set, ``WORLD_SIZE > 1``): rank ``r`` is shard ``r/W``. Rank 0
  reads the group's state and broadcasts it (torch.distributed, gloo); if the group is new, rank 0
  allocates it and every rank meets at a barrier before its first write; every rank writes its own
  blocks; a barrier ends the group, so the group is complete when any rank moves on.

**One configuration.** Every shard checks its configuration (``CapturePlan.group_config``, batch size
included) against the group's before any model loads when the group exists, and at its first write when
another shard allocated it meanwhile; a shard that disagrees is refused in one line naming the differing
parameters. Each ``--shard`` run (and torchrun's rank 0) ends with a line saying whether the group is
complete and, if not, which shards still own incomplete blocks.

**A group grown by seeds** (a capture asking for seeds the group lacks, see :mod:`trajlab.store_groups`)
is grown before any block runs, by whoever may allocate (the others wait for it; torchrun ranks meet
rank 0 at a barrier); its new samples form a segment whose blocks start afresh, numbered after the
stored ones (:func:`blocks`).

Neither: one process, unchanged behaviour. ``--shard`` together with torchrun is refused.
Resume: every process skips its complete blocks and redoes its incomplete ones, so re-running a
killed shard (or rank set) redoes only that shard's incomplete samples.

Nothing here imports torch at module level (``--shard`` is checked before any heavy import).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

WAIT_ENV = "TRAJLAB_SHARD_WAIT_S"


class ShardError(ValueError):
    """A bad ``--shard`` value or combination (one line for the user)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ShardError(f"--shard {self.index}/{self.count}: expected I/N with 0 <= I < N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, block: int) -> bool:
        return block % self.count == self.index

    def block_starts(self, n_samples: int, batch_size: int) -> list[int]:
        """First sample of every block of this shard (block b -> shard b % count)."""
        return [s for b, s in enumerate(range(0, n_samples, batch_size)) if self.owns(b)]

    def mine(self, all_blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """This shard's blocks of :func:`blocks` (block b -> shard b % count)."""
        return [blk for b, blk in enumerate(all_blocks) if self.owns(b)]


def blocks(n_samples: int, batch_size: int, segments=(0,)) -> list[tuple[int, int]]:
    """(start, stop) of every block of a group: ``batch_size`` samples at a time from the first sample of
    each segment (a group grown by seeds has one segment per capture that added samples, see
    :mod:`trajlab.store_groups`), so a block never mixes stored and new samples. Numbered across segments."""
    bounds = sorted({int(s) for s in segments if 0 <= int(s) < n_samples} | {0}) + [n_samples]
    return [(a, min(a + batch_size, e)) for s, e in zip(bounds, bounds[1:]) for a in range(s, e, batch_size)]


def parse_shard(text) -> Shard | None:
    """``"I/N"`` (or a Shard, or None) -> Shard | None."""
    if text is None or isinstance(text, Shard):
        return text
    i, sep, n = str(text).partition("/")
    try:
        if not sep:
            raise ValueError
        return Shard(int(i), int(n))
    except ValueError:
        raise ShardError(f"--shard {text!r}: expected I/N with 0 <= I < N (e.g. 0/2)") from None


def torchrun_shard() -> Shard | None:
    """This process's shard under torchrun (``RANK``/``WORLD_SIZE``), None outside it or when W == 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    return Shard(int(os.environ["RANK"]), world)


def check(shard) -> Shard | None:
    """Validate a ``--shard`` value against the environment (no torch import); the effective Shard."""
    shard = parse_shard(shard)
    ranks = torchrun_shard()
    if shard is not None and ranks is not None:
        raise ShardError(f"--shard {shard} under torchrun (WORLD_SIZE={ranks.count}): use one or the other; "
                         "torchrun already splits the samples across its ranks")
    return shard or ranks


# -- coordinators ---------------------------------------------------------------------------------------
class Coordinator:
    """One process, no sharding: allocates, never waits."""

    shard = Shard(0, 1)
    label = ""

    def __init__(self, path):
        self.path = path

    def group_state(self, group: str, n_samples: int):
        """(exists, done mask) of ``group``; the same answer on every rank."""
        import numpy as np

        from trajlab import store

        if group in store.group_names(self.path):
            return True, store.completed(self.path, group)
        return False, np.zeros(n_samples, dtype=bool)

    def may_allocate(self) -> bool:
        return True

    def grow(self, group: str, grow, seeds) -> None:
        """Main thread, before any block of an existing group: ``grow()`` it (idempotent: adds the seeds it
        lacks, completes a growth cut short) when this process may allocate; otherwise wait until the
        allocating process has grown it to ``seeds``."""
        if self.may_allocate():
            grow()
        else:
            from trajlab.store_groups import wait_for_seeds

            wait_for_seeds(self.path, group, seeds, timeout=float(os.environ.get(WAIT_ENV, "3600")))

    def obtain(self, group: str, allocate, check_config) -> None:
        """Called by the writer thread before its first write to a group that is not there yet."""
        if self.may_allocate():
            allocate()
        else:
            from trajlab import store

            store.wait_for_group(self.path, group, timeout=float(os.environ.get(WAIT_ENV, "3600")))
            check_config()

    # collective hooks (torchrun only)
    def after_first_put(self, allocated: threading.Event) -> None:
        """Main thread, after the first batch of a new group is queued."""

    def before_first_put(self) -> None:
        """Main thread, before the first batch of a new group is queued."""

    def end_group(self, new_group: bool, any_put: bool) -> None:
        """Main thread, after the writer is closed."""


class ShardCoordinator(Coordinator):
    """``--shard I/N``: independent processes; on an object store only shard 0 allocates."""

    def __init__(self, path, shard: Shard):
        super().__init__(path)
        self.shard = shard
        self.label = f" [shard {shard}]"

    def may_allocate(self) -> bool:
        from trajlab import store

        return store.is_local(self.path) or self.shard.index == 0


class TorchrunCoordinator(Coordinator):
    """torchrun ranks: rank 0 decides and allocates; barriers around the group."""

    def __init__(self, path, shard: Shard):
        super().__init__(path)
        self.shard = shard
        self.label = f" [rank {shard}]"
        init_distributed()

    def group_state(self, group: str, n_samples: int):
        import torch.distributed as dist

        state = [super().group_state(group, n_samples) if self.shard.index == 0 else None]
        dist.broadcast_object_list(state, src=0)
        return state[0]

    def may_allocate(self) -> bool:
        return self.shard.index == 0

    def grow(self, group: str, grow, seeds) -> None:
        """Rank 0 grows the group; every rank meets it at a barrier."""
        if self.shard.index == 0:
            grow()
        self._barrier()

    def after_first_put(self, allocated: threading.Event) -> None:
        if self.shard.index == 0:
            allocated.wait()
            self._barrier()

    def before_first_put(self) -> None:
        if self.shard.index != 0:
            self._barrier()

    def end_group(self, new_group: bool, any_put: bool) -> None:
        if new_group and not any_put:  # this rank had no block: it still meets rank 0's allocation barrier
            self._barrier()
        self._barrier()

    @staticmethod
    def _barrier() -> None:
        import torch.distributed as dist

        dist.barrier()


def init_distributed() -> None:
    """Join torchrun's process group (gloo: barriers and small broadcasts only, CPU or GPU runs alike)
    and pin this rank's GPU to ``LOCAL_RANK`` so that ``--device cuda`` means one GPU per rank."""
    import datetime

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get(WAIT_ENV, "3600"))))


def setup(shard=None) -> Shard | None:
    """Check ``shard`` against the environment and, under torchrun, join the process group now (before
    pipelines load, so ``cuda`` resolves to this rank's GPU). Returns the effective Shard or None."""
    eff = check(shard)
    if eff is not None and parse_shard(shard) is None:
        init_distributed()
    return eff


def coordinator(path, shard=None) -> Coordinator:
    """The coordinator of a capture into ``path``: torchrun, ``--shard``, or one process."""
    explicit = parse_shard(shard)
    eff = check(explicit)
    if eff is None or eff.count == 1:
        return Coordinator(path)
    if explicit is None:
        return TorchrunCoordinator(path, eff)
    return ShardCoordinator(path, eff)


__all__ = ["Coordinator", "Shard", "ShardError", "blocks", "check", "coordinator", "init_distributed", "parse_shard", "setup",
           "torchrun_shard"]
