"""Hybrid inference: k = 0 is the pure student, k = all the pure teacher; the store records the hand-off."""
import json

import numpy as np
import torch
import pytest

from trajlab import store
from trajlab.capture import CapturePlan, capture
from trajlab.experiments.hybrid_plans import hybrid_plan
from trajlab.models.hybrid import HybridPipeline, HybridSpec, SwitchScheduler, handoff_grid

PROMPTS = ["a cat", "a dog"]
SEEDS = [0, 1]
T, S = 6, 3


def capture_hybrid(teacher_pipe, student_pipe, plan, path, *, group: str | None = None, progress: bool = False):
    """Capture one hybrid plan (from `hybrid_plan`) into ``path`` through the plain
    ``trajlab.capture.capture`` on a `HybridPipeline` of the given parts; returns the CaptureResult.

    lora mechanism: pass the same pipeline (UNet with the LoRA loaded) as teacher and student.
    Schedulers: built from the parts' current scheduler configs with the spec's scheduler names.
    (Test helper: `run_plans` loads its parts with `load_hybrid_pipeline` instead.)
    """
    h = plan.extra.get("hybrid")
    if not h:
        raise ValueError("plan.extra['hybrid'] is missing: build hybrid plans with hybrid_plan()")
    pipe = HybridPipeline(teacher_pipe, student_pipe, h.get("mechanism", "pipelines"))
    pipe.configure(h)
    return capture(pipe, plan, path, group=group or plan.extra.get("group"), progress=progress)


def _vals(path, group, var):
    return np.asarray(store.open(path)[group].to_dataset()[var].values)


@pytest.fixture(scope="module")
def pipes():
    from trajlab.models.loading import load_pipeline

    return load_pipeline("tiny-sd", scheduler="default"), load_pipeline("tiny-lcm", scheduler="default")


def test_handoff_grid_tells_the_student_the_true_timestep(pipes):
    t, s = pipes
    from trajlab.models.schedulers import make_scheduler

    sw = SwitchScheduler(make_scheduler("ddim", t.scheduler.config), make_scheduler("lcm", s.scheduler.config))
    tt, st, info = handoff_grid(sw.teacher, sw.student, HybridSpec("a", "b", 2, T, S))
    assert len(tt) == 2 and tt[0] > tt[1] > info["handoff_timestep"]
    assert st[0] == info["student_start_timestep"] == info["handoff_timestep"]  # the state's own timestep
    assert abs(info["nearest_distillation_timestep"] - info["handoff_timestep"]) <= 10  # nearest of a 20-spaced grid
    assert all(a > b for a, b in zip(st, st[1:])) and list(sw.student.timesteps.numpy()) == st


def test_paper_handoff_runs_the_first_k_of_the_students_own_steps(pipes):
    """Gandikota & Bau's hand-off: teacher grid = the student's grid (its scheduler and step count); after k
    steps the student continues on exactly the rest of its own grid."""
    t, s = pipes
    from trajlab.models.schedulers import make_scheduler

    sw = SwitchScheduler(make_scheduler("lcm", t.scheduler.config), make_scheduler("lcm", s.scheduler.config))
    ref = make_scheduler("lcm", s.scheduler.config)
    ref.set_timesteps(4)
    own = [int(x) for x in ref.timesteps]
    tt, st, info = handoff_grid(sw.teacher, sw.student, HybridSpec("a", "b", 1, 4, 4, teacher_scheduler="lcm"))
    assert tt == own[:1] and st == own[1:] and info["student_start_timestep"] == own[1]


def test_pipelines_mechanism_endpoints_and_record(pipes, tmp_path):
    teacher, student = pipes
    out = str(tmp_path / "h.zarr")
    capture(teacher, CapturePlan("tiny-sd", PROMPTS, SEEDS, scheduler="ddim", steps=T, guidance=5.0), out,
            group="teacher", progress=False)
    capture(student, CapturePlan("tiny-lcm", PROMPTS, SEEDS, scheduler="lcm", steps=S, guidance=8.0), out,
            group="student", progress=False)
    groups = {}
    for k in (0, 2, T):
        plan = hybrid_plan(HybridSpec("tiny-sd", "tiny-lcm", k, T, S, 5.0, 8.0), PROMPTS, SEEDS)
        groups[k] = capture_hybrid(teacher, student, plan, out).group
    assert isinstance(teacher.scheduler, SwitchScheduler) is False  # restored
    for var in ("final_latent", "image", "latent"):
        np.testing.assert_array_equal(_vals(out, groups[0], var), _vals(out, "student", var))
        np.testing.assert_array_equal(_vals(out, groups[T], var), _vals(out, "teacher", var))
    np.testing.assert_allclose(_vals(out, groups[T], "x0_pred"), _vals(out, "teacher", "x0_pred"), atol=1e-4)
    mid = _vals(out, groups[2], "final_latent")
    assert np.abs(mid - _vals(out, "student", "final_latent")).max() > 1e-3
    assert np.abs(mid - _vals(out, "teacher", "final_latent")).max() > 1e-3
    attrs = store.group_attrs(out, groups[2])
    extra = json.loads(attrs["extra"]) if isinstance(attrs["extra"], str) else attrs["extra"]
    h = extra["hybrid"]
    assert h["handoff_step"] == 2 and h["teacher"] == "tiny-sd" and h["student"] == "tiny-lcm"
    assert len(h["teacher_timesteps"]) == 2 and h["student_start_timestep"] == h["student_timesteps"][0]
    ds = store.open(out)[groups[2]].to_dataset()
    assert ds.sizes["step"] == 2 + len(h["student_timesteps"])
    assert list(ds["timestep"].values) == h["teacher_timesteps"] + h["student_timesteps"]
    store.validate(out)


def test_lora_mechanism_endpoints(tmp_path):
    from peft import LoraConfig

    from trajlab.models.loading import load_pipeline

    pipe = load_pipeline("tiny-sd", scheduler="default")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="student")
    base = dict(pipe.scheduler.config)
    out = str(tmp_path / "l.zarr")
    from trajlab.models.schedulers import make_scheduler

    pipe.disable_lora()
    pipe.scheduler = make_scheduler("ddim", base)
    capture(pipe, CapturePlan("tiny-sd", PROMPTS[:1], SEEDS, scheduler="ddim", steps=T, guidance=5.0), out,
            group="teacher", progress=False)
    pipe.enable_lora()
    pipe.scheduler = make_scheduler("lcm", base)
    capture(pipe, CapturePlan("tiny-sd", PROMPTS[:1], SEEDS, scheduler="lcm", steps=S, guidance=1.0), out,
            group="student", progress=False)
    pipe.scheduler = make_scheduler("ddim", base)
    g = {}
    for k in (0, T):
        spec = HybridSpec("tiny-sd", "tiny-sd+lora", k, T, S, 5.0, 1.0, mechanism="lora")
        g[k] = capture_hybrid(pipe, pipe, hybrid_plan(spec, PROMPTS[:1], SEEDS), out).group
    np.testing.assert_array_equal(_vals(out, g[0], "final_latent"), _vals(out, "student", "final_latent"))
    np.testing.assert_array_equal(_vals(out, g[T], "final_latent"), _vals(out, "teacher", "final_latent"))
    # the LoRA matters: with it on, the teacher's result differs
    assert np.abs(_vals(out, "teacher", "final_latent") - _vals(out, g[0], "final_latent")).max() > 1e-3


def test_lora_mechanism_refuses_two_pipelines(pipes, tmp_path):
    teacher, student = pipes
    plan = hybrid_plan(HybridSpec("tiny-sd", "tiny-lcm", 1, T, S, mechanism="lora"), PROMPTS, SEEDS)
    with pytest.raises(ValueError, match="one pipeline"):
        capture_hybrid(teacher, student, plan, str(tmp_path / "x.zarr"))


def test_spec_validation():
    with pytest.raises(ValueError, match="handoff_step"):
        HybridSpec("a", "b", 7, teacher_steps=6).validate()
    with pytest.raises(ValueError, match="mechanism"):
        HybridSpec("a", "b", 1, mechanism="magic").validate()


def _assert_replays(ds, h, teacher_base, student_base):
    """The store's convention on a fresh scheduler per part: latent[:, i+1] == step(model_output[:, i],
    timestep[i], latent[:, i]) (teacher DDIM, then student LCM with the captured noise); the last
    step gives final_latent."""
    from trajlab.models.denoiser import replay_generators
    from trajlab.models.schedulers import make_scheduler

    lat, mo = (torch.from_numpy(np.asarray(ds[v].values)) for v in ("latent", "model_output"))
    k, n = len(h["teacher_timesteps"]), ds.sizes["step"]
    nxt = torch.cat([lat[:, 1:], torch.from_numpy(np.asarray(ds["final_latent"].values))[:, None]], 1)
    teacher = make_scheduler(h["teacher_scheduler"], teacher_base)
    teacher.set_timesteps(h["teacher_steps"])
    student = make_scheduler(h["student_scheduler"], student_base)
    student.set_timesteps(timesteps=h["student_timesteps"]) if k else student.set_timesteps(h["student_steps"])
    gens = replay_generators(ds["seed"].values, lat.shape[2:])
    for i in range(n):
        s, t = (teacher, teacher.timesteps[i]) if i < k else (student, student.timesteps[i - k])
        kw = {"generator": gens} if s is student else {}
        out = s.step(mo[:, i], t, lat[:, i], return_dict=False, **kw)[0]
        assert torch.equal(out, nxt[:, i]), f"step {i}"


def test_sd_hybrid_replays_on_fresh_schedulers(pipes, tmp_path):
    teacher, student = pipes
    out = str(tmp_path / "r.zarr")
    plan = hybrid_plan(HybridSpec("tiny-sd", "tiny-lcm", 2, T, S, 5.0, 8.0), PROMPTS, SEEDS, images=False)
    g = capture_hybrid(teacher, student, plan, out).group
    _assert_replays(store.open_group(out, g).load(), plan.extra["hybrid"], dict(teacher.scheduler.config),
                    dict(student.scheduler.config))


def test_sdxl_hybrid_through_plain_capture_replays(tmp_path):
    """An SDXL hybrid (tiny-sdxl teacher with CFG + added conditioning, tiny-sdxl student with an LCM
    scheduler) loads from its plan record, captures through the plain capture() and replays; the
    pipeline's unet (DenoiserSwitch) is called once per step of both parts."""
    from trajlab.models.hybrid import load_hybrid_pipeline
    from trajlab.models.schedulers import make_scheduler
    from trajlab.models.tiny import tiny_sdxl

    base = dict(tiny_sdxl().scheduler.config)
    spec = HybridSpec("tiny-sdxl", "tiny-sdxl", 2, 4, 3, 5.0, 1.0, "ddim", "lcm")
    plan = hybrid_plan(spec, PROMPTS, SEEDS, teacher_sched=make_scheduler("ddim", base),
                       student_sched=make_scheduler("lcm", base), images=True)
    h = plan.extra["hybrid"]
    pipe = load_hybrid_pipeline(h, dtype="fp32", device="cpu")
    assert isinstance(pipe, HybridPipeline) and pipe.teacher_pipe is not pipe.student_pipe
    with pytest.raises(ValueError, match="differ"):
        pipe.configure({**h, "teacher_timesteps": [t + 1 for t in h["teacher_timesteps"]]})
    pipe.configure(h)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda m, a, o: calls.append((m.active, a[0].shape[0])))
    try:
        pipe(PROMPTS[:1], generator=[torch.Generator().manual_seed(0)], output_type="latent")
    finally:
        handle.remove()
    assert calls == [("teacher", 2)] * 2 + [("student", 1)] * len(h["student_timesteps"])
    out = str(tmp_path / "xl.zarr")
    res = capture(pipe, plan, out, group=plan.extra["group"], progress=False)
    ds = store.open_group(out, res.group).load()
    assert ds.attrs["pipeline_class"] == "HybridPipeline" and ds.sizes["step"] == 2 + len(h["student_timesteps"])
    assert np.isfinite(ds["x0_pred"].values).all() and ds["image"].shape[0] == 4
    _assert_replays(ds, h, base, base)
