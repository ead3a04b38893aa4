"""Verdicts: is a failure real? The engine (effects with crossed-design CIs, TOST-style decisions, Holm),
matching, the real-data reference, one file per failure mode (``modes/``), the catalogue, a store's
verdicts and their calibration."""
from trajlab.verdicts.engine import (CHECKS, DECISIONS, MIN_PROMPTS, MIN_SEEDS, Comparison, GroupInfo, PromptStat,
                                     crossed_interval, decide, evaluate, holm, run_family, verdict_dataset)

__all__ = ["CHECKS", "DECISIONS", "MIN_PROMPTS", "MIN_SEEDS", "Comparison", "GroupInfo", "PromptStat",
           "crossed_interval", "decide", "evaluate", "holm", "run_family", "verdict_dataset"]
