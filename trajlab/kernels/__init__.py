"""Optional GPU kernels (Triton). Import submodules lazily; Triton may be absent."""


def triton_available() -> bool:
    """True when `triton` imports (kernels then run on CUDA, or on CPU with TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
