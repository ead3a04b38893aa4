"""Background writer: a bounded queue drained by one thread that fills pre-allocated store regions.

The sampling loop only enqueues host copies (it blocks only if the writer falls ``maxsize`` items
behind). Per batch the writer assembles (sample, step, ...) arrays, writes them to the batch's
disjoint sample region, and only then marks those samples complete. Errors in the thread are
re-raised in the caller at the next ``put`` or at ``close``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from trajlab import store
from trajlab.capture.records import StepRecord
from trajlab.models.x0 import derive_x0

STEP_FIELDS = {"latent": "sample", "x0_pred": "x0", "model_output": "model_output",
               "model_output_uncond": "uncond", "model_output_cond": "cond", "denoised": "denoised"}


def numpy_dtype(torch_dtype: torch.dtype) -> np.dtype:
    """Storage dtype for a run dtype (bf16 has no numpy type: stored as float32)."""
    return np.dtype({torch.float16: "float16", torch.float64: "float64"}.get(torch_dtype, "float32"))


def _np(t: torch.Tensor) -> np.ndarray:
    """Host tensor -> numpy in its own precision (bf16 -> float32); the store casts to the group's dtype."""
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _import_backends() -> None:
    """Import zarr (with its codecs), xarray and dask.array now, in the calling thread. A writer thread that imported
    them first while the main thread imported the same packages could fail with ``KeyError('zarr')`` (Python's
    import of a submodule whose parent another thread is still initialising)."""
    import dask.array  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401
    import zarr.codecs  # noqa: F401


@dataclass
class BatchEnd:
    """Marks the end of one batch: samples ``[start, start + size)`` and their final outputs."""

    start: int
    size: int
    final_latent: torch.Tensor
    images: np.ndarray | None
    event: object = None


class StoreWriter:
    """Drains records into group ``group`` of the store at ``path``.

    ``allocate(first_records, batch_end)`` is called once, before the first write, when the group does
    not exist yet (its shapes and step grid come from the first batch); it may also obtain the group
    from another process (sharded captures). ``allocated`` is set once the group exists for this writer
    (or the writer failed). ``on_batch_written(size)`` is called after each batch is committed (for
    progress bars). ``check()`` is called instead of ``allocate`` when the group turns out to exist at the
    first write (another process allocated it meanwhile): it refuses a group of another configuration.
    """

    def __init__(self, path, group: str, allocate: Callable | None, maxsize: int = 256,
                 on_batch_written: Callable[[int], None] | None = None, check: Callable | None = None):
        self.path, self.group, self.allocate, self.check = path, group, allocate, check
        self.on_batch_written = on_batch_written
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.grid: list[float] | None = None
        self.allocated = threading.Event()
        self._records: list[StepRecord] = []
        _import_backends()  # here, not first in the writer thread while the sampling thread imports too
        self._thread = threading.Thread(target=self._run, name="trajlab-writer", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------------
    def put(self, item) -> None:
        self._raise()
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            if isinstance(err, store.StoreError):  # a refused group (config, name): the user's one line
                raise err
            raise RuntimeError(f"trajlab capture writer failed: {err!r}") from err

    # -- consumer side -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure so the producer never blocks
            try:
                if isinstance(item, StepRecord):
                    self._records.append(item)
                else:
                    self._write_batch(item)
            except BaseException as exc:  # noqa: BLE001 - surfaced in the producer
                self.error = exc
                self._records = []
                self.allocated.set()  # nobody waits forever on a failed writer

    def _write_batch(self, end: BatchEnd) -> None:
        records, self._records = self._records, []
        if not records:
            raise RuntimeError(f"batch at sample {end.start} produced no scheduler steps")
        for r in records:
            r.wait()
        if end.event is not None:
            end.event.synchronize()
        grid = [r.timestep for r in records]
        if self.grid is None:
            if self.group not in store.group_names(self.path):
                if self.allocate is None:
                    raise RuntimeError(f"group {self.group!r} does not exist and no allocator was given")
                self.allocate(records, end)
            elif self.check is not None:  # another process allocated it since the run began: same config or refuse
                self.check()
            self.allocated.set()
            stored = store.step_grid(self.path, self.group)  # also when another process allocated it
            if len(stored) != len(grid) or not np.allclose(stored, grid):
                raise RuntimeError(f"this run's timesteps {grid} differ from those stored in {self.group!r}: "
                                   f"{list(stored)}")
            self.grid = grid
        elif grid != self.grid:
            raise RuntimeError(f"batch at sample {end.start} ran timesteps {grid}; earlier batches ran {self.grid}")
        arrays = {}
        for var, attr in STEP_FIELDS.items():
            if var == "x0_pred":
                per_step = [r.x0 if r.x0 is not None else derive_x0(r.prediction_type, r.model_output, r.sample, r.level)
                            for r in records]
            else:
                per_step = [getattr(r, attr) for r in records]
            if any(t is None for t in per_step):
                continue
            arrays[var] = np.stack([_np(t) for t in per_step], axis=1)
        for var in records[0].extra:  # named module taps, attention maps
            missing = [i for i, r in enumerate(records) if var not in r.extra]
            if missing:
                raise RuntimeError(f"{var} was not produced at step(s) {missing} of the batch at sample {end.start} (the "
                                   "tapped module did not run before those scheduler steps)")
            arrays[var] = np.stack([_np(r.extra[var]) for r in records], axis=1)
        arrays["final_latent"] = _np(end.final_latent)
        if end.images is not None:
            arrays["image"] = end.images
        store.write_samples(self.path, self.group, end.start, arrays)
        store.mark_complete(self.path, self.group, end.start, end.start + end.size)
        if self.on_batch_written is not None:
            self.on_batch_written(end.size)
