"""Noise re-injection share of step inconsistency (a mechanism row, not a failure of its own).

The same weights under an LCM step family (LCMScheduler draws fresh noise after every step) against their
TCD family (TCDScheduler at gamma = eta = 0: deterministic re-noising with the model's own epsilon), on the
step counts both have, matched by (prompt, seed). Supported: fresh noise makes the output change more with
the step count than the deterministic path does. Effect: log ratio of consecutive-step RMS; margin 0.1.
Planted (calibration): as step_inconsistency.
"""
from __future__ import annotations

from trajlab.analysis import sweeps as S
from trajlab.verdicts.engine import not_applicable
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import step_family_row


def rows(ctx):
    desc = ctx.desc
    by_config: dict[tuple, dict[str, list[str]]] = {}
    for key, names in S.families(desc, "steps").items():
        rest = tuple((k, v) for k, v in key if k != "scheduler")
        by_config.setdefault(rest, {})[dict(key)["scheduler"]] = names
    out = []
    for scheds in by_config.values():
        if "LCMScheduler" not in scheds or "TCDScheduler" not in scheds:
            continue
        common = {desc[n]["steps"] for n in scheds["LCMScheduler"]} & {desc[n]["steps"] for n in scheds["TCDScheduler"]}
        lcm = [n for n in scheds["LCMScheduler"] if desc[n]["steps"] in common]
        tcd = [n for n in scheds["TCDScheduler"] if desc[n]["steps"] in common]
        comp = MODE.comparison(" / ".join(tcd), " / ".join(lcm))
        if len(common) < 2:
            out.append(not_applicable(comp, f"the LCM and TCD families share {len(common)} step count(s); "
                                            "consecutive step counts need >= 2"))
            continue
        out.append(step_family_row(ctx, comp, tcd, lcm))
    return out


MODE = FailureMode(
    name="step_inconsistency_reinjection", family="dynamics",
    metric="RMS between consecutive step counts: LCM sampler (fresh noise each step) / the same weights under TCD "
           "gamma 0 (deterministic re-noising)", direction="increase", effect="log_ratio", margin=0.1,
    reference="the same weights under TCD gamma 0 at the same step counts",
    planted="fresh noise of scale m added to the output at every step count", rows=rows,
    plant=lambda m: {"fresh_noise": m}, mechanism=True)
