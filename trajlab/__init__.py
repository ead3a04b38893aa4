"""trajlab: mechanistic trajectory analysis for efficient diffusion models."""

__version__ = "0.1.0"


def open(path, **kwargs):  # noqa: A001
    """Open a trajectory store as an ``xarray.DataTree`` (see :mod:`trajlab.store`)."""
    from trajlab.store import open as _open

    return _open(path, **kwargs)
