"""The catalogue of failure modes: one entry per mode, each defined in its own file under ``modes/``.

=============================  ============  ================================================  =========  ==========  ======
failure mode                   family        per-sample metric (per prompt)                    direction  effect      margin
=============================  ============  ================================================  =========  ==========  ======
diversity_collapse             distribution  pairwise distance (micro-LPIPS / pixel RMS)       decrease   log ratio   0.05
canonical_bias                 distribution  in the prompt's most populous mode (0/1)          increase   difference  0.05
mode_dropping                  distribution  in the prompt's rarest mode (0/1)                 decrease   difference  0.03
fine_detail                    structure     power fraction in the data's upper band           decrease   log ratio   0.1
early_commitment               dynamics      log sigma of commitment (x0-mode stability)       increase   difference  0.1
step_inconsistency             dynamics      RMS between consecutive step counts               increase   log ratio   0.1
step_inconsistency_reinjection dynamics      the same, LCM / TCD gamma 0 (mechanism row)       increase   log ratio   0.1
cfg_over_amplification         control       |ink - data ink| / data ink, matched guidance     increase   log ratio   0.1
weak_negative_prompt           control       RMS(with negative - without), matched guidance    decrease   log ratio   0.1
alignment_loss (shapes)        control       every stated attribute read right (judge, 0/1)    decrease   difference  0.05
compositional_fragility (sh.)  structure     binding and relation read right (judge, 0/1)      decrease   difference  0.05
texture_loss (shapes)          structure     stated stripes read right (judge, 0/1)            decrease   difference  0.05
canonical_bias_prior (shapes)  distribution  left-out attributes at the exact prior's mode     increase   difference  0.05
mode_dropping_prior (shapes)   distribution  left-out attributes at a rare value (share)       decrease   difference  0.03
cfg_off_palette (shapes)       control       RGB distance to the palette, matched guidance     increase   log ratio   0.1
weak_negative_attribute (sh.)  control       negated attribute removed (judge), matched w      decrease   difference  0.05
=============================  ============  ================================================  =========  ==========  ======

The last seven are the shapes world's (``FailureMode.world == "shapes"``), read by its attribute judge or its
palette: applicable to that world's stores, "not applicable" (with the reason) elsewhere, calibrated in its
generator world.
"""
from __future__ import annotations

from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes import (alignment_loss, canonical_bias, canonical_bias_prior, cfg_off_palette,
                                    cfg_over_amplification, compositional_fragility, diversity_collapse, early_commitment,
                                    fine_detail, mode_dropping, mode_dropping_prior, step_inconsistency,
                                    step_inconsistency_reinjection, texture_loss, weak_negative_attribute,
                                    weak_negative_prompt)

CATALOGUE: dict[str, FailureMode] = {m.MODE.name: m.MODE for m in (
    diversity_collapse, canonical_bias, mode_dropping, fine_detail, early_commitment, step_inconsistency,
    step_inconsistency_reinjection, cfg_over_amplification, weak_negative_prompt, alignment_loss,
    compositional_fragility, texture_loss, canonical_bias_prior, mode_dropping_prior, cfg_off_palette,
    weak_negative_attribute)}

PIXEL_MODES = tuple(n for n, m in CATALOGUE.items() if m.world == "any")
"""The modes calibrated in the pixel world (:mod:`trajlab.verdicts.calibration`)."""

NOT_MEASURED: dict[str, str] = {"text_rendering": "structure", "thin_structures": "structure", "counting": "structure"}
"""The research plan's failure modes no shipped world can show yet (no comparison, no verdict): mode -> family.
Prompt suites may tag prompts with them."""
SUITE_CATEGORY = {"distribution": "distributional", "structure": "structural", "dynamics": "dynamical",
                  "control": "control"}
"""Family -> the category word prompt suites use (``category = "structural"``)."""


def taxonomy() -> dict[str, tuple[str, ...]]:
    """{suite category: failure modes}: every catalogued failure mode (mechanism rows left out) and the
    :data:`NOT_MEASURED` ones, by family; what a prompt suite's ``category`` / ``failure_mode`` may say."""
    out: dict[str, list[str]] = {c: [] for c in SUITE_CATEGORY.values()}
    for m in CATALOGUE.values():
        if not m.mechanism:
            out[SUITE_CATEGORY[m.family]].append(m.name)
    for name, family in NOT_MEASURED.items():
        out[SUITE_CATEGORY[family]].append(name)
    return {c: tuple(v) for c, v in out.items()}


def get(name: str) -> FailureMode:
    """The failure mode called ``name``; an unknown name is refused with the known ones."""
    if name not in CATALOGUE:
        raise KeyError(f"unknown failure mode {name!r}; expected one of {sorted(CATALOGUE)}")
    return CATALOGUE[name]


__all__ = ["CATALOGUE", "NOT_MEASURED", "PIXEL_MODES", "SUITE_CATEGORY", "get", "taxonomy"]
