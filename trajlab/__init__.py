"""trajlab: mechanistic trajectory analysis for efficient diffusion models."""

__version__ = "0.1.0"


def open(path, group=None, **kwargs):  # noqa: A001
    """Open a trajectory store as an ``xarray.DataTree`` (see :mod:`trajlab.store`); with ``group`` (a
    group's name or label), or a path ``STORE/GROUP``, that one group as an ``xarray.Dataset``
    (``chunks`` as for the store)."""
    from trajlab.store import open as _open
    from trajlab.store_groups import open_group, split_group_path

    if group is None:
        path, group = split_group_path(path)
    if group is not None:
        return open_group(path, group, chunks=kwargs.get("chunks"))
    return _open(path, **kwargs)


def __getattr__(name):
    """``trajlab.capture``: the capture package, callable as ``trajlab.capture(pipe, path, taps=[...])`` (the Python
    capture API, :class:`trajlab.capture.session.CaptureSession`), imported on first use."""
    if name == "capture":
        import importlib

        return importlib.import_module("trajlab.capture")
    raise AttributeError(f"module 'trajlab' has no attribute {name!r}")
