"""Where the analyses' dask computations run: dask's local threaded scheduler (the default), an existing
``dask.distributed`` scheduler (``--scheduler ADDRESS``), or a ``LocalCluster`` of N worker processes
(``--workers N``).

    from trajlab.analysis.cluster import dask_cluster
    with dask_cluster(address="tcp://10.0.0.5:8786") as client:   # or workers=4, or neither
        compute_results(store, out)                                # every dask read runs on the cluster

Stores open lazily (``trajlab.open``: dask arrays, one sample per chunk) and the analyses read them in
bounded sample chunks (:func:`trajlab.analysis.io.map_sample_chunks`); inside :func:`dask_cluster` each
chunk's read and decompression run on the cluster's workers and only the chunk comes back. The workers
must reach the store by the same path or URL (a shared filesystem, or ``s3://...``). No torch import.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys

__all__ = ["ClusterError", "WorkerLosses", "check_address", "dask_cluster", "probe_scheduler"]

CONNECT_TIMEOUT_S = 10.0
"""Seconds to wait for a scheduler at ``--scheduler ADDRESS`` to answer before giving up."""

_ADDRESS = re.compile(r"^(?:(tcp|tls|inproc|ucx|ws|wss)://)?[^\s:/]+:\d{1,5}$")


class ClusterError(ValueError):
    """A scheduler address is malformed or unreachable, or dask.distributed is missing."""


def check_address(address: str) -> str:
    """``address`` as a dask scheduler address (``tcp://HOST:PORT``; ``HOST:PORT`` gets ``tcp://``);
    :class:`ClusterError` naming the address and the expected form otherwise. Does not connect."""
    text = str(address).strip()
    if not _ADDRESS.match(text):
        raise ClusterError(f"scheduler address {address!r} is not of the form tcp://HOST:PORT "
                           "(what `dask scheduler` prints as 'Scheduler at:')")
    port = int(text.rsplit(":", 1)[1])
    if not 0 < port < 65536:
        raise ClusterError(f"scheduler address {address!r}: port {port} is out of range 1..65535")
    return text if "://" in text else f"tcp://{text}"


def probe_scheduler(address: str, timeout: float | None = None) -> dict:
    """Ask ``address`` who it is (dask's ``identity`` call) before anything relies on it: the connection, dask's
    handshake and the answer all within ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`; dask's own
    ``connect`` waits for the handshake without a bound, so a live port that is not dask's would hang). Returns
    the scheduler's identity; :class:`ClusterError` in one line when nothing answers, the port does not speak
    dask, or it is not a scheduler (a worker, a nanny)."""
    import asyncio
    import socket

    address = check_address(address)
    timeout = CONNECT_TIMEOUT_S if timeout is None else float(timeout)
    if address.startswith("tcp://"):  # refused or unreachable: said at once (dask retries until its timeout)
        host, port = address[6:].rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as exc:
            raise ClusterError(f"--scheduler {address}: cannot connect ({exc.strerror or type(exc).__name__}); is "
                               "`dask scheduler` running there?") from None
    _distributed()

    async def ask():
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        identity = asyncio.run(asyncio.wait_for(ask(), timeout))
    except (asyncio.TimeoutError, TimeoutError):
        raise ClusterError(f"--scheduler {address}: nothing answered as a dask scheduler within {timeout:g} s (is that "
                           "port a dask scheduler's? `dask scheduler` prints its address)") from None
    except OSError as exc:  # refused, or closed (dask's CommClosedError is an OSError)
        raise ClusterError(f"--scheduler {address}: not a dask scheduler (the connection failed or was closed: "
                           f"{type(exc).__name__}); is `dask scheduler` running there?") from None
    except Exception as exc:  # noqa: BLE001 - a reply that is not dask's protocol
        raise ClusterError(f"--scheduler {address}: not a dask scheduler (its reply is not dask's protocol: "
                           f"{type(exc).__name__}); is `dask scheduler` running there?") from None
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind != "Scheduler":
        raise ClusterError(f"--scheduler {address}: answered as a dask {kind or type(identity).__name__}, not a "
                           "scheduler: give the address `dask scheduler` prints")
    return identity


def _distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError("--scheduler / --workers need dask.distributed: pip install distributed "
                           "(requirements/constraints.txt pins it)") from None
    return distributed


class WorkerLosses(logging.Filter):
    """While entered: dask.distributed's log records about workers that died (the nanny's restart warnings, a
    restart that failed, with their tracebacks) are kept off the terminal and counted; :meth:`summary` is the one
    line that replaces them. Every other record passes."""

    LOSS = re.compile(r"Restarting worker|Failed to (re)?start|Worker process \d+ (was killed|exited)|"
                      r"KilledWorker|Removing worker|lost|Nanny .* (close|restart)", re.IGNORECASE)

    def __init__(self):
        super().__init__()
        self.restarts = self.failed = self.other = 0
        self._handlers: list = []
        self._seen: dict = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("distributed") or record.levelno < logging.WARNING:
            return True
        msg = record.getMessage()
        if not self.LOSS.search(msg):
            return True
        if id(record) in self._seen:  # one record, several handlers (distributed's own, the root's)
            return False
        self._seen[id(record)] = record
        if "Restarting worker" in msg:
            self.restarts += 1
        elif "Failed to restart" in msg:
            self.failed += 1
        else:
            self.other += 1
        return False

    def __enter__(self):
        root = logging.getLogger("distributed")
        self._handlers = list(root.handlers) + list(logging.getLogger().handlers)
        for h in self._handlers:
            h.addFilter(self)
        return self

    def __exit__(self, *exc):
        for h in self._handlers:
            h.removeFilter(self)
        self._handlers = []
        return False

    def summary(self) -> str:
        """One line on the workers lost, or "" when none was."""
        lost = self.restarts or (1 if self.failed or self.other else 0)
        if not lost:
            return ""
        how = (f"{self.failed} could not be restarted (dask's nanny)" if self.failed else "restarted")
        return (f"dask: {lost} worker process(es) died during the analyses, {how}; the cluster ran their tasks again, "
                "so the results are those of an undisturbed run")


@contextlib.contextmanager
def dask_cluster(address: str | None = None, workers: int | None = None, *, threads_per_worker: int = 1,
                 memory_limit: str | int = "auto", timeout: float | None = None):
    """Context in which dask computations run on a ``distributed.Client`` (also the default client, which
    xarray's NetCDF writer asks for its lock); yields it (None when neither
    ``address`` nor ``workers`` is given: dask's default local scheduler, nothing started).

    address: an existing scheduler (checked by :func:`check_address`, then connected within ``timeout``
    seconds, default :data:`CONNECT_TIMEOUT_S`, else :class:`ClusterError`). workers: start a ``LocalCluster`` of that many worker
    processes with ``threads_per_worker`` threads and ``memory_limit`` each (closed on exit).
    """
    if address is not None and workers is not None:
        raise ClusterError("give --scheduler ADDRESS or --workers N, not both")
    if address is None and workers is None:
        yield None
        return
    if workers is not None and int(workers) < 1:
        raise ClusterError(f"--workers {workers}: expected >= 1 worker processes")
    import dask

    dist = _distributed()
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    cluster = None
    if address is not None:
        probe_scheduler(address, timeout)  # a port that is not a dask scheduler: one line, never a hang
        try:
            client = dist.Client(address, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"--scheduler {address}: no dask scheduler answered within {timeout:g} s "
                               f"({type(exc).__name__}); is `dask scheduler` running there?") from None
    else:
        cluster = dist.LocalCluster(n_workers=int(workers), threads_per_worker=threads_per_worker, processes=True,
                                    memory_limit=memory_limit, dashboard_address=":0")
        client = dist.Client(cluster)
    losses = WorkerLosses()
    try:
        with dask.config.set(scheduler=client), losses:
            yield client
    finally:
        with losses:  # closing the cluster logs the dead workers' nannies again
            client.close()
            if cluster is not None:
                cluster.close()
        line = losses.summary()
        if line:
            print(line, file=sys.stderr, flush=True)
