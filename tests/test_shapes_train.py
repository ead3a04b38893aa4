"""Retraining the shapes world with stages side by side (``--jobs``): the scheduler starts a stage only after the
stages it reads, never runs more than ``jobs`` at once, stops on a failure naming it; stages run as processes write
one train_log.json without losing each other's records."""

import json
import sys

import pytest

from trajlab.worlds.shapes import train as TR


def _sleeper(tmp_path, fail=()):
    """A stand-in stage process: sleeps 0.15 s, exits 1 for the stages in ``fail``."""
    def command(stage):
        code = f"import time, sys; time.sleep(0.15); sys.exit({1 if stage in fail else 0})"
        return [sys.executable, "-c", code]
    return command


def _overlap(timeline) -> int:
    """The largest number of stages running at one time."""
    events = sorted([(v["start_s"], 1) for v in timeline.values()] + [(v["end_s"], -1) for v in timeline.values()],
                    key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_schedule_starts_a_stage_after_what_it_reads_and_runs_at_most_jobs(tmp_path, jobs):
    timeline = TR.schedule(TR.STAGES, jobs, _sleeper(tmp_path), tmp_path / "logs", poll_s=0.02)
    assert set(timeline) == set(TR.STAGES)
    for stage, needs in TR.NEEDS.items():
        for need in needs:
            assert timeline[stage]["start_s"] >= timeline[need]["end_s"], (stage, need, timeline)
    assert _overlap(timeline) <= jobs
    if jobs > 1:  # independent stages do run side by side
        assert _overlap(timeline) == jobs
    assert all((tmp_path / "logs" / f"{s}.log").exists() for s in TR.STAGES)


def test_schedule_reads_stages_not_asked_for_from_the_folder(tmp_path):
    """Only students asked: none waits for a teacher that is not in the run."""
    students = ["lcm", "pcm", "turbo"]
    timeline = TR.schedule(students, 3, _sleeper(tmp_path), tmp_path / "logs", poll_s=0.02)
    assert _overlap(timeline) == 3


def test_schedule_stops_on_a_failed_stage_and_names_it(tmp_path):
    with pytest.raises(SystemExit, match=r"\['teacher'\] failed.*teacher\.log.*not started: \[.*'lcm'"):
        TR.schedule(TR.STAGES, 2, _sleeper(tmp_path, fail={"teacher"}), tmp_path / "logs", poll_s=0.02)


def test_longest_chain_first():
    """vae and clip (the teacher waits for them) before the judge (nothing waits for it); the students longest first."""
    order = sorted(TR.STAGES, key=lambda s: -TR._chain_s(s, TR.STAGES))
    assert order.index("judge") > max(order.index("vae"), order.index("clip"))
    students = [s for s in order if s in TR.STUDENTS]
    assert [TR.CPU_S[s] for s in students] == sorted((TR.CPU_S[s] for s in students), reverse=True)


def test_bad_jobs_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="--jobs 0"):
        TR.main(["--out", str(tmp_path), "--jobs", "0"])


def test_two_stage_processes_side_by_side_write_one_log(tmp_path):
    """``--jobs 2`` on the VAE and the CLIP (a few steps each): both folders, both records and the run's timeline."""
    out = tmp_path / "world"
    TR.main(["--out", str(out), "--stages", "vae,clip", "--quick", "--jobs", "2", "--checkpoint", str(tmp_path / "ck" / "t.ckpt")])
    assert (out / "shapes-vae" / "config.json").exists() and (out / "shapes-clip").is_dir()
    log = json.loads((out / "train_log.json").read_text())
    assert log["vae"]["steps"] == TR.QUICK["vae"] and log["clip"]["steps"] == TR.QUICK["clip"]
    assert set(log["_last_run"]["timeline"]) == {"vae", "clip"} and log["_last_run"]["jobs"] == 2
    assert (tmp_path / "ck" / "vae.log").exists()


def test_knobs_override_a_recipe_and_refuse_unknown_names(monkeypatch):
    import copy

    from trajlab.worlds.shapes import students as ST

    monkeypatch.setattr(ST, "RECIPES", copy.deepcopy(ST.RECIPES))
    assert TR.set_knobs(["pcm.adv_real=target", "turbo.adv_weight=0.5"]) == {"pcm": {"adv_real": "target"}, "turbo": {"adv_weight": 0.5}}
    assert ST.RECIPES["pcm"]["adv_real"] == "target" and ST.RECIPES["turbo"]["adv_weight"] == 0.5
    with pytest.raises(SystemExit, match="'pcm' has no knob 'gan'.*adv_real"):
        TR.set_knobs(["pcm.gan=1"])
    with pytest.raises(SystemExit, match="unknown stage 'sdxl'"):
        TR.set_knobs(["sdxl.lr=1"])
    with pytest.raises(SystemExit, match="expected STAGE.KEY=VALUE"):
        TR.set_knobs(["pcm=1"])
    with pytest.raises(SystemExit, match="no knob 'paper'"):
        TR.set_knobs(["pcm.paper=x"])
