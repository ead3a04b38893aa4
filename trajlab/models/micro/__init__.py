"""The digits micro-world: a trained teacher (micro-sd), an LCM student (micro-lcm), an
LCM-LoRA-style student (micro-lcm-lora), PCM / TLCM / Turbo (ADD) / DMD2 students (micro-pcm,
micro-tlcm, micro-turbo, micro-dmd; see students.py), a CLIP-style scorer (micro-clip) and a CNN labeller,
all trained on scikit-learn's digits so trajlab's study runs on a CPU with real failure modes.

Weights ship in ``data/micro`` (retrain: ``python -m trajlab.models.micro.train --out data/micro``;
measure: ``python -m trajlab.models.micro.quality``).
"""

from __future__ import annotations

from pathlib import Path

from .data import PROMPTS

MICRO_DIR = Path(__file__).resolve().parents[3] / "data" / "micro"
"""<repo>/data/micro (equals Path(trajlab.__file__).resolve().parents[1] / "data" / "micro")."""

NAMES = ("micro-sd", "micro-lcm", "micro-lcm-lora", "micro-clip", "micro-pcm", "micro-tlcm", "micro-turbo", "micro-dmd")


def micro_paths(root: str | Path | None = None) -> dict[str, Path]:
    """{name: folder} for every name in NAMES under ``root`` (default MICRO_DIR)."""
    root = MICRO_DIR if root is None else Path(root)
    return {name: root / name for name in NAMES}


def load_micro_clip(directory: str | Path | None = None, device: str = "cpu"):
    """(model, preprocess, tokenizer) of micro-clip via open_clip's own loading path.

    preprocess: PIL image -> (3, 32, 32) tensor; tokenizer: list[str] -> (N, 77) int64 ids.
    """
    from .scorer import load_clip

    return load_clip(micro_paths()["micro-clip"] if directory is None else directory, device=device)


def load_labeller(directory: str | Path | None = None):
    """``f(images) -> (labels (N,) int64, probs (N, 10) float32)`` (numpy arrays).

    images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] (numpy or torch), or PIL images.
    """
    from .labeller import load_labeller_module, make_labeller

    return make_labeller(load_labeller_module(MICRO_DIR / "labeller" if directory is None else directory))


def load_micro_lora(pipe, folder: str | Path | None = None, scale: float = 1.0, adapter_name: str = "lcm") -> str:
    """Load micro-lcm-lora onto a micro-sd pipeline (peft if installed, else fused); see ``lora.load_micro_lora``."""
    from .lora import load_micro_lora as _load

    return _load(pipe, micro_paths()["micro-lcm-lora"] if folder is None else folder, scale, adapter_name)


__all__ = ["MICRO_DIR", "NAMES", "PROMPTS", "micro_paths", "load_micro_clip", "load_labeller", "load_micro_lora"]
