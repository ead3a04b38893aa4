"""What a failure mode is (:class:`FailureMode`) and what its rows see of a store (:class:`Context`).

Each failure mode lives in one file of :mod:`trajlab.verdicts.modes`: its declared comparison (metric,
direction, effect, margin, preconditions), its statistic on a store, the rows it adds to a store's
family, and its planted failure (the calibration world's sampler knobs at magnitude m). The catalogue
(:mod:`trajlab.verdicts.catalogue`) lists them; "where is failure X defined?" has one answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import xarray as xr

from trajlab.verdicts.engine import Comparison

FAMILIES = ("distribution", "structure", "dynamics", "control")


@dataclass(frozen=True)
class FailureMode:
    """One failure mode's declaration.

    metric: what the per-sample (or per-prompt) statistic measures, with units. direction: how the failure
    moves the candidate's metric vs the reference ("decrease" | "increase"). effect: "log_ratio" |
    "difference". margin: the smallest effect that matters (effect units); "supported" means at least this.
    requires: preconditions (engine.CHECKS). reference: how the reference group is chosen (plain words).
    planted: the planted failure of the calibration world at magnitude m (plain words).
    rows(ctx) -> list of evaluated rows. plant(m) -> calibration sampler knobs.
    """

    name: str
    family: str
    metric: str
    direction: str
    effect: str
    margin: float
    reference: str
    planted: str
    rows: Callable[["Context"], list]
    plant: Callable[[float], dict]
    requires: tuple[str, ...] = ("same_prompts", "same_n", "paired_seeds")
    mechanism: bool = False
    """True for a row that explains another failure (not a failure itself)."""
    uses_modes: bool = False
    """True when its rows read ``Context.modes`` (the k-means modes of each prompt)."""
    world: str = "any"
    """"any": judged on every store and calibrated in the pixel world (:mod:`trajlab.verdicts.calibration`);
    "shapes": read by the shapes world's attribute judge, applicable to its stores only and calibrated in its
    generator world (:mod:`trajlab.verdicts.calibration_shapes`)."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"FailureMode {self.name}: family={self.family!r}; expected one of {FAMILIES}")
        self.comparison("ref", "cand")  # validates direction, effect, margin, requires

    def comparison(self, ref: str, cand: str, *, metric: str | None = None, margin: float | None = None) -> Comparison:
        """The pre-declared comparison of this mode between groups ``ref`` and ``cand``."""
        return Comparison(self.name, metric or self.metric, ref, cand, self.direction,
                          self.margin if margin is None else margin, effect=self.effect, requires=self.requires)


@dataclass
class Context:
    """A store as the modes see it: groups {name: Dataset}, their descriptions (sweeps.describe), the
    reference teacher group, the student groups compared with it, the real-data reference (``data``:
    modes, ink, band, diversity; see :mod:`trajlab.verdicts.reference`) and the x0 decoder for commitment
    (decode(ds, sample_idx, step) -> uint8 images, or None). ``data["prompts"]``: the world's whole declared
    prompt set; a comparison over exactly those prompts is about them, not a sample of prompts
    (:func:`trajlab.verdicts.engine.crossed_interval`)."""

    groups: dict[str, xr.Dataset]
    desc: dict[str, dict]
    teacher: str
    students: list[str]
    data: dict = field(default_factory=dict)
    decode: Callable | None = None
    modes: dict = field(default_factory=dict)
    diversity: tuple = ()
    cache: dict = field(default_factory=dict)

    @property
    def population(self):
        """The world's whole prompt set (``data["prompts"]``), or None when the prompts are a sample."""
        return self.data.get("prompts")


def with_metric(mode: FailureMode, metric: str) -> FailureMode:
    return replace(mode, metric=metric)


__all__ = ["FAMILIES", "Context", "FailureMode", "with_metric"]
