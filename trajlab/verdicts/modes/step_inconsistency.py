"""Step inconsistency: a student's output changes more between consecutive step counts than the teacher's
own weights do between the same step counts.

Statistic: per seed, the mean over consecutive step counts of the RMS distance between the final images
(pixel substitute). Reference: the teacher model under the reference teacher's scheduler and guidance at
exactly the student family's step counts (the step range is matched: comparing 1/2/4/8-step students with
a 10/20/30-step teacher measures mostly the step range). Effect: log ratio; failure: an increase >= 0.1.
Planted (calibration): fresh noise of scale m added to the student's output at every step count.
"""
from __future__ import annotations

from trajlab.analysis import sweeps as S
from trajlab.verdicts.engine import not_applicable
from trajlab.verdicts.mode import FailureMode
from trajlab.verdicts.modes._pairs import step_family_row
from trajlab.verdicts.modes.cfg_over_amplification import find


def rows(ctx):
    desc, t = ctx.desc, ctx.desc[ctx.teacher]
    out = []
    for key, names in S.families(desc, "steps").items():
        if desc[names[0]]["role"] != "student":
            continue
        steps = [desc[n]["steps"] for n in names]
        ref = [find(desc, t["model"], t["scheduler"], k, t["guidance"]) for k in steps]
        label = f"{t['model']} {t['scheduler'].replace('Scheduler', '')} at {'/'.join(map(str, steps))} steps"
        comp = MODE.comparison(label, " / ".join(names))
        missing = [k for k, r in zip(steps, ref) if r is None]
        if missing:
            out.append(not_applicable(comp, f"the teacher's own weights were not captured at the student's step "
                                            f"counts {missing} (same scheduler and guidance as the reference)"))
            continue
        out.append(step_family_row(ctx, comp, ref, names))
    return out


MODE = FailureMode(
    name="step_inconsistency", family="dynamics",
    metric="RMS between consecutive step counts (grey pixels), student family / the teacher's own weights at the "
           "same step counts", direction="increase", effect="log_ratio", margin=0.1,
    reference="the teacher model, reference scheduler and guidance, at the student family's step counts",
    planted="fresh noise of scale m added to the output at every step count", rows=rows,
    plant=lambda m: {"fresh_noise": m})
