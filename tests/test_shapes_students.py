"""The shapes world's students: every recipe trains (two steps on the shipped teacher), saves in its real format,
and loads back through the registry as trajlab capture loads it; the adversarial terms actually train; the study's
intervals are paired across configurations (the crossed design)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trajlab.worlds import world_path
from trajlab.worlds.shapes import students as ST
from trajlab.worlds.shapes import study as SY

SHIPPED = world_path("shapes/shapes-sd")
pytestmark = pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="shapes-sd not shipped")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every student stage, 2 steps each, from the shipped shapes-sd into a fresh world folder."""
    from trajlab.worlds.shapes import train as TR

    root = tmp_path_factory.mktemp("worlds") / "shapes"
    root.mkdir()
    shutil.copytree(SHIPPED, root / "shapes-sd")
    for f in ("judge.safetensors", "judge.json"):
        shutil.copy(SHIPPED.parent / f, root / f)
    TR.run(root, stages=tuple(ST.STAGES), quick=True)
    return root


def test_every_student_folder_is_written_with_its_recipe(trained):
    log = json.loads((trained / "train_log.json").read_text())
    for name in ST.STAGES:
        folder = trained / f"shapes-{name}"
        info = json.loads((folder / "trajlab.json").read_text())
        assert info["recipe"] == name and info["departures"] == ST.RECIPES[name]["departures"] and info["departures"]
        assert log[name]["steps"] == 2 and np.isfinite(log[name]["last_loss"])
    # the LoRA students are diffusers LoRA files (save_lora_weights of a PEFT adapter, PEFT keys), TLCM a PEFT
    # adapter folder
    from safetensors.torch import load_file

    for name in ("lcm-lora", "pcm"):
        keys = list(load_file(str(trained / f"shapes-{name}" / "pytorch_lora_weights.safetensors")))
        assert keys and all(k.startswith("unet.") and any(t in k for t in (".lora_A.", ".lora_B.")) for k in keys), keys[:3]
        assert any(".attn1.to_q." in k for k in keys) and any(".attn2.to_k." in k for k in keys)
    cfg = json.loads((trained / "shapes-tlcm" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "shapes-sd" and cfg["r"] == ST.RECIPES["tlcm"]["rank"]


@pytest.mark.parametrize("name", [m for m in ST.STAGES])
def test_students_load_through_the_registry_and_sample(trained, name, monkeypatch):
    from trajlab.models import registry as reg
    from trajlab.models.loading import load_pipeline

    monkeypatch.setenv("TRAJLAB_WORLDS_DIR", str(trained.parent))
    spec = reg.get(f"shapes-{name}")
    pipe = load_pipeline(spec.name)
    out = pipe(["a small red striped circle at the top left"], num_inference_steps=spec.steps, guidance_scale=spec.guidance,
               generator=torch.Generator().manual_seed(0), height=32, width=32, output_type="np").images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    if spec.loras:  # the adapter changes the teacher's output: it was loaded, not silently skipped
        base = load_pipeline("shapes-sd", scheduler=spec.scheduler)
        ref = base(["a small red striped circle at the top left"], num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                   generator=torch.Generator().manual_seed(0), height=32, width=32, output_type="np").images
        assert np.abs(out - ref).max() > 0
        # and every factor of the file was loaded (the attention projections too): none silently dropped
        from safetensors.torch import load_file

        f = "adapter_model" if name == "tlcm" else "pytorch_lora_weights"
        saved = load_file(str(trained / f"shapes-{name}" / f"{f}.safetensors"))
        loaded = [n for n, _ in pipe.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        assert len(loaded) == len(saved) and any(".attn1.to_q.lora_A." in n for n in loaded), (len(loaded), len(saved))


def test_lora_students_leave_the_teacher_weights_alone(trained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(trained / "shapes-sd"), torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(trained / "shapes-lcm-lora"), adapter_name="lcm")
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_feature_critic_trains_only_its_heads_and_separates_real_from_fake():
    """PCM's and ADD's discriminator: frozen teacher features, trainable heads; on separable data (real latents vs
    pure noise) its hinge loss leaves chance (2) within a few updates: the adversarial term is not stuck at chance."""
    from trajlab.models.micro.pcm import Adversary
    from trajlab.worlds.shapes import teacher as T

    unet = T.build_unet(seed=0)
    critic = ST.FeatureCritic(unet, seed=0)
    names = {n for n, _ in critic.named_parameters()}
    assert names and all(n.startswith("heads.") for n in names)
    g = torch.Generator().manual_seed(0)
    real = torch.zeros(16, 4, 8, 8) + 1.5
    fake = torch.randn(16, 4, 8, 8, generator=g)
    cond = torch.randn(16, 5, T.CROSS_DIM, generator=g)
    s = torch.full((16,), 259)
    adv = Adversary(critic, lr=1e-3)
    losses = [adv.d_step(real, fake, s, cond) for _ in range(30)]
    assert losses[0] > 1.5 and min(losses[-5:]) < 1.0, losses[::5]
    frozen = dict(unet.named_parameters())
    assert all(torch.equal(p, frozen[n]) for n, p in critic.features.unet.named_parameters())


def test_dmd2_gan_term_is_on_and_off_as_declared(trained):
    log = json.loads((trained / "train_log.json").read_text())
    assert "d_loss_last_tenth" in log["dmd2"] and abs(log["dmd2"]["d_loss_chance"] - 2 * np.log(2)) < 1e-12
    assert "d_loss_last_tenth" not in log["dmd2-no-gan"]
    assert ST.RECIPES["turbo"]["adv_weight"] / ST.RECIPES["turbo"]["distill_weight"] == pytest.approx(1 / 2.5)
    assert ST.RECIPES["turbo-distill-heavy"]["adv_weight"] < ST.RECIPES["turbo"]["adv_weight"]


def test_study_replicates_are_paired_across_configurations():
    """The same seed resample for every prompt and configuration: identical statistics give identical replicates
    (a zero-width difference), and the pair-mean CLIP variance equals metrics.clip.clip_variance."""
    from trajlab.metrics.clip import clip_variance, unit

    rng = np.random.default_rng(3)
    n = 7
    stats = {}
    for p in ("a", "b", "c"):
        e = unit(rng.normal(size=(n, 5)))
        x = rng.random((n, 4))
        lp = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        stats[p] = {"shapes_lpips": lp, "clip_variance": np.maximum(2 - 2 * e @ e.T, 0) / 2, "clip_alignment": rng.random(n), "_e": e}
    r1 = SY.replicates(stats, n, n_boot=200)
    r2 = SY.replicates({k: dict(v) for k, v in stats.items()}, n, n_boot=200)
    for u in SY.DIVERSITY:
        assert np.array_equal(r1[u], r2[u])
        assert np.nanstd(r1[u]) > 0
    est = SY.point(stats)
    assert est["clip_variance"] == pytest.approx(np.mean([clip_variance(s["_e"]) for s in stats.values()]), rel=1e-10)


def test_study_refuses_unknown_configs():
    with pytest.raises(SystemExit, match="unknown model 'shapes-nope'"):
        SY.parse_configs("shapes-sd:30,shapes-nope:4")
    with pytest.raises(SystemExit, match="NAME:STEPS"):
        SY.parse_configs("shapes-lcm:0")
