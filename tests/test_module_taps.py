"""Named module taps and cross-attention maps: bitwise-neutral capture, values as the modules computed them,
labelled dims, reductions, names refused with the nearest ones, info's bytes per sample, config checks."""

import numpy as np
import pytest
import torch

from trajlab import store
from trajlab.capture import CapturePlan, capture
from trajlab.capture.module_taps import ModuleTaps, TapError, TapSpec, cross_attention_layers, parse_taps
from trajlab.cli import main
from trajlab.models.schedulers import make_scheduler

KW = dict(model="tiny-sd", prompts=["a cat", "a red dog"], seeds=[0, 1], scheduler="ddim", steps=3, guidance=3.0,
          height=32, width=32, batch_size=4)
TAPS = ["mid_block",
        {"name": "down_blocks.1.attentions.0", "reduce": "spatial_mean", "dtype": "float16", "branch": "both"},
        {"name": "up_blocks.1", "channels": "0:8", "branch": "uncond"},
        {"name": "up_blocks.0.attentions.0.transformer_blocks.0.attn2", "channels": [1, 3]}]


@pytest.fixture()
def ddim(tiny_sd, tiny_sd_base_config):
    tiny_sd.scheduler = make_scheduler("ddim", tiny_sd_base_config)
    return tiny_sd


def _reference(pipe, names):
    """Every listed module's raw output per denoiser call of a plain run (2B rows: uncond, cond), in order."""
    unet = pipe.unet
    seen = {n: [] for n in names}
    mods = dict(unet.named_modules())
    handles = [mods[n].register_forward_hook(
        lambda m, a, o, n=n: seen[n].append((o[0] if isinstance(o, tuple) else getattr(o, "sample", o)).detach().clone()))
        for n in names]
    try:
        prompts = [p for p in KW["prompts"] for _ in KW["seeds"]]
        gens = [torch.Generator().manual_seed(s) for _ in KW["prompts"] for s in KW["seeds"]]
        images = pipe(prompts, num_inference_steps=KW["steps"], guidance_scale=KW["guidance"], generator=gens,
                      output_type="np", height=32, width=32).images
    finally:
        for h in handles:
            h.remove()
    return seen, images


def test_taps_and_attention_are_bitwise_neutral_and_store_what_the_modules_computed(ddim, tmp_path):
    plain = capture(ddim, CapturePlan(**KW), tmp_path / "a.zarr", progress=False)
    tapped = capture(ddim, CapturePlan(**KW, taps=TAPS, attention_maps=True), tmp_path / "b.zarr", progress=False)
    a = store.open_group(tmp_path / "a.zarr", plain.group).load()
    b = store.open_group(tmp_path / "b.zarr", tapped.group).load()
    assert plain.group == tapped.group, "taps are not part of the group's name"
    for v in a.data_vars:  # everything the plain capture stores, bit for bit (images included)
        if v != "checksum":
            np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)
    seen, images = _reference(ddim, [t if isinstance(t, str) else t["name"] for t in TAPS])
    np.testing.assert_array_equal(b.image.values, (np.clip(images, 0, 1) * 255).round().astype(np.uint8))

    def steps(name):  # (sample, step, ...) from the reference: one denoiser call per step, 2B rows
        return torch.stack(seen[name], dim=1)

    mid = steps("mid_block")  # (8, 3, C, H, W): rows 4..7 are the conditional half
    assert b["tap.mid_block"].dims == ("sample", "step", "tap.mid_block.channel", "tap.mid_block.y", "tap.mid_block.x")
    np.testing.assert_array_equal(b["tap.mid_block"].values, mid[4:].numpy())
    attn = steps("down_blocks.1.attentions.0")
    both = torch.stack([attn[:4], attn[4:]], dim=2).float().mean(dim=(-2, -1)).to(torch.float16)
    assert b["tap.down_blocks.1.attentions.0"].dims[2] == "branch"
    assert list(b["branch"].values) == ["uncond", "cond"]
    np.testing.assert_array_equal(b["tap.down_blocks.1.attentions.0"].values, both.numpy())
    up = steps("up_blocks.1")
    np.testing.assert_array_equal(b["tap.up_blocks.1"].values, up[:4, :, 0:8].numpy())  # the unconditional half
    assert list(b["tap.up_blocks.1.channel"].values) == list(range(8))
    a2 = steps("up_blocks.0.attentions.0.transformer_blocks.0.attn2")  # (B, N, D): channels on the last dim
    np.testing.assert_array_equal(b["tap.up_blocks.0.attentions.0.transformer_blocks.0.attn2"].values,
                                  a2[4:][..., [1, 3]].numpy())
    entries = {e["name"]: e for e in store.decode_attrs(b.attrs)["step_arrays"]}
    assert entries["tap.up_blocks.1"]["branch"] == "uncond" and entries["tap.mid_block"]["module_class"] == \
        "UNetMidBlock2DCrossAttn"
    # attention: (sample, step, token, y, x) on the latent grid, tokens of the longest prompt with SOS/EOS
    assert b.attention.dims == ("sample", "step", "token", "y", "x")
    assert b.attention.shape == (4, 3, 5, 16, 16) and b.attention.dtype == np.float16
    assert list(b.token_text.values[1]) == ["<|startoftext|>", "a", "red", "dog", "<|endoftext|>"]
    assert b.token_text.values[0][-1] == ""
    mass = b.attention.sum("token").values
    assert np.all(mass > 0) and np.all(mass <= 1 + 1e-2)


class _Recording:
    """diffusers' AttnProcessor (explicit softmax), keeping the probabilities it computes."""

    def __init__(self, log, name):
        from diffusers.models.attention_processor import AttnProcessor

        self.inner, self.log, self.name = AttnProcessor(), log, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        original = attn.get_attention_scores

        def scores(q, k, mask=None):
            p = original(q, k, mask)
            self.log.setdefault(self.name, []).append(p.detach().clone())
            return p

        attn.get_attention_scores = scores
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
        finally:
            del attn.get_attention_scores


def test_recomputed_attention_equals_the_probabilities_the_layer_computes(ddim):
    layers = cross_attention_layers(ddim.unet)
    assert len(layers) == 6 and all(n.endswith("attn2") for n in layers)
    reference, ours = {}, {}
    saved = ddim.unet.attn_processors
    ddim.unet.set_attn_processor({k: (_Recording(reference, k.rsplit(".processor", 1)[0]) if
                                      k.rsplit(".processor", 1)[0] in layers else v) for k, v in saved.items()})
    taps = ModuleTaps(ddim.unet, [], batch_size=4, attention_tokens=77)
    taps._add_layer = lambda name, probs: ours.setdefault(name, []).append(probs)
    try:
        with taps:
            _reference(ddim, [])
    finally:
        ddim.unet.set_attn_processor(saved)
    assert set(ours) == set(layers)
    for name in layers:
        for mine, theirs in zip(ours[name], reference[name], strict=True):
            heads = layers[name].heads
            torch.testing.assert_close(mine, theirs.view(-1, heads, *theirs.shape[1:]).float(), rtol=1e-5, atol=1e-6)


def test_attention_aggregation_upsamples_and_averages_layers():
    """DAAM on the latent grid: a half-resolution layer putting all mass on token 0 and a full-resolution one on
    token 1 average to 0.5 / 0.5 everywhere; every cell is a distribution over the stored tokens."""


    taps = ModuleTaps(torch.nn.Sequential(), [], batch_size=1, attention_tokens=3, to_host=lambda t: t.clone())
    taps._grid = (4, 6)
    low = torch.zeros(1, 2, 2 * 3, 3)
    low[..., 0] = 1
    full = torch.zeros(1, 2, 4 * 6, 3)
    full[..., 1] = 1
    taps._add_layer("low", low)
    taps._add_layer("full", full)
    maps = taps.take()["attention"].float()
    assert maps.shape == (1, 3, 4, 6)
    torch.testing.assert_close(maps[0, 0], torch.full((4, 6), 0.5))
    torch.testing.assert_close(maps[0, 1], torch.full((4, 6), 0.5))
    assert float(maps[0, 2].abs().max()) == 0
    peaked = torch.zeros(1, 1, 2 * 3, 3)
    peaked[0, 0, 0, 2] = 1  # token 2 at the top-left cell of the 2x3 layer only
    peaked[0, 0, 1:, 0] = 1
    taps._add_layer("peaked", peaked)
    m = taps.take()["attention"].float()[0]
    torch.testing.assert_close(m.sum(0), torch.ones(4, 6), rtol=0, atol=2e-3)
    assert m[2, 0, 0] == m[2].max() and m[2, -1, -1] == 0


def test_tap_specs_are_checked_without_torch():
    assert TapSpec.parse("mid_block").to_dict() == {"name": "mid_block", "reduce": "none", "channels": None,
                                                     "dtype": "native", "branch": "cond"}
    assert parse_taps([{"name": "x", "reduce": "mean", "channels": "2,0:2", "dtype": "fp16"}])[0] == \
        {"name": "x", "reduce": "spatial_mean", "channels": [0, 1, 2], "dtype": "float16", "branch": "cond"}
    for bad in ({"name": "x", "reduce": "max"}, {"name": "x", "channels": "3:1"}, {"name": "x", "branch": "guided"},
                {"reduce": "none"}, {"name": "x", "colour": 1}, ["x", "x"]):
        with pytest.raises(TapError):
            parse_taps(bad if isinstance(bad, list) else [bad])


def test_a_tap_name_that_does_not_exist_is_refused_before_the_run_with_the_nearest(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    args = ["capture", "--model", "tiny-sd", "--steps", "2", "--height", "32", "--width", "32", "--quiet",
            "--prompt", "a cat", "--seeds", "0:2", "--out", str(out)]
    assert main([*args, "--tap", "mid_blok"]) == 2
    err = capsys.readouterr().err
    assert "tap 'mid_blok': no such module" in err and "nearest: mid_block" in err and err.count("\n") == 1
    assert main([*args, "--tap", "down_blocks.1.attentions"]) == 2  # a ModuleList: tap one of its items
    assert "down_blocks.1.attentions.0" in capsys.readouterr().err
    assert main([*args, "--tap-reduce", "spatial_mean"]) == 2
    assert "give --tap NAME" in capsys.readouterr().err
    assert not out.exists(), "refused before anything was written"


def test_taps_command_lists_names_and_marks_cross_attention(capsys):
    assert main(["taps", "micro-sd", "--depth", "4"]) == 0
    text = capsys.readouterr().out
    assert "\nmid_block " in text and "down_blocks.1.attentions.0 " in text and "UNetMidBlock2DCrossAttn" in text
    assert "down_blocks.1.attentions " not in text, "containers cannot be tapped"
    assert main(["taps", "micro-sd", "--grep", "attn2"]) == 0
    text = capsys.readouterr().out
    assert "[cross-attention]" in text and "4 cross-attention layer(s)" in text


def test_cli_and_toml_taps_info_bytes_and_a_group_captured_without_them(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    base = ["capture", "--model", "tiny-sd", "--steps", "2", "--height", "32", "--width", "32", "--quiet",
            "--prompt", "a cat", "--seeds", "0:2", "--out", str(out)]
    assert main(base) == 0
    assert main([*base, "--tap", "mid_block", "--tap-reduce", "spatial_mean"]) == 2  # same group, other content
    err = capsys.readouterr().err
    assert "taps: store has None" in err and "--group NAME" in err
    assert main([*base, "--tap", "mid_block", "--tap-reduce", "spatial_mean", "--tap-dtype", "float16",
                 "--attention-maps", "--group", "tapped"]) == 0
    capsys.readouterr()
    assert main(["info", f"{out}/tapped"]) == 0
    info = capsys.readouterr().out
    raw = 2 * 64 * 2  # steps x channels x float16
    assert f"tap.mid_block (tap.mid_block.channel) 2x64 float16: {raw / 1e3:.1f} kB per sample raw" in info
    assert "attention (token, y, x)" in info and "kB stored" in info
    cfg = tmp_path / "grid.toml"
    cfg.write_text(f'model = "tiny-sd"\nsteps = 2\nheight = 32\nwidth = 32\nprompts = ["a dog"]\nseeds = "0:1"\n'
                   f'out = "{tmp_path / "t.zarr"}"\ntaps = ["mid_block", {{name = "up_blocks.1", channels = "0:4"}}]\n')
    assert main(["capture", "--config", str(cfg), "--quiet"]) == 0
    (g,) = store.group_names(tmp_path / "t.zarr")
    ds = store.open_group(tmp_path / "t.zarr", g)
    assert ds["tap.up_blocks.1"].shape[:3] == (1, 2, 4) and "tap.mid_block" in ds
    cfg.write_text(cfg.read_text().replace('"mid_block"', '"mid_blocks"'))
    assert main(["capture", "--config", str(cfg), "--quiet"]) == 2
    assert "nearest: mid_block" in capsys.readouterr().err


def test_a_group_with_taps_grows_by_seeds_and_resumes(ddim, tmp_path):
    plan = CapturePlan(**{**KW, "seeds": [0]}, taps=["mid_block"], attention_maps=True)
    first = capture(ddim, plan, tmp_path / "s.zarr", progress=False)
    before = store.open_group(tmp_path / "s.zarr", first.group).load()
    grown = capture(ddim, CapturePlan(**KW, taps=["mid_block"], attention_maps=True), tmp_path / "s.zarr",
                    progress=False)
    after = store.open_group(tmp_path / "s.zarr", grown.group).load()
    assert after.sizes["sample"] == 4 and bool(after.complete.all())
    old = after.isel(sample=[i for i, s in enumerate(after.seed.values) if s == 0])
    np.testing.assert_array_equal(old["tap.mid_block"].values, before["tap.mid_block"].values)
    np.testing.assert_array_equal(old.attention.values, before.attention.values)
    assert np.isfinite(after["tap.mid_block"].values).all()


def test_sdxl_taps_and_attention_maps_are_neutral(tmp_path):
    """SDXL: cross-attention over both text encoders' 77 tokens, micro-conditioning, an Euler scheduler."""
    from trajlab.capture.run import to_uint8
    from trajlab.models.tiny import tiny_sdxl

    pipe = tiny_sdxl()
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", height=32, width=32)
    plain = pipe(["a cat", "a red dog"], generator=[torch.Generator().manual_seed(0) for _ in range(2)], **kw).images
    plan = CapturePlan(model="tiny-sdxl", prompts=["a cat", "a red dog"], seeds=[0], scheduler="euler", steps=3,
                       guidance=5.0, height=32, width=32, batch_size=2, taps=["mid_block"], attention_maps=True)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    ds = store.open_group(tmp_path / "s.zarr", res.group).load()
    np.testing.assert_array_equal(ds.image.values, to_uint8(plain))
    assert ds.attention.shape[:3] == (2, 3, 5) and ds["tap.mid_block"].shape[:2] == (2, 3)
    assert np.all(ds.attention.sum("token").values <= 1 + 1e-2)


def test_a_step_array_that_disagrees_with_its_entry_is_refused_on_open(ddim, tmp_path):
    import json

    from trajlab.store_fs import target, zarr

    path = tmp_path / "s.zarr"
    res = capture(ddim, CapturePlan(**{**KW, "steps": 2}, taps=["mid_block"]), path, progress=False)
    store.validate(path)
    g = zarr().open_group(target(path), mode="r+", zarr_format=3, use_consolidated=False)[res.group]
    entries = json.loads(g.attrs["step_arrays"])
    entries[0]["dims"] = ["tap.mid_block.channel"]
    g.attrs["step_arrays"] = json.dumps(entries)
    from trajlab.store_fs import consolidate

    consolidate(path)
    with pytest.raises(store.StoreError, match="tap.mid_block missing or not"):
        store.validate(path)


def test_a_hybrid_is_tapped_in_both_parts_bitwise_neutral_with_each_steps_part_values(tmp_path):
    """A hybrid (teacher for k steps, then the student) records its taps and attention maps from whichever UNet
    ran the step: the values equal the modules' outputs (the teacher's CFG rows: the conditional half) recorded
    with plain forward hooks in an uncaptured run; the trajectory and images are bitwise those without taps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_hybrid import capture_hybrid

    from trajlab.experiments.hybrid_plans import hybrid_plan
    from trajlab.models.hybrid import HybridPipeline, HybridSpec
    from trajlab.models.loading import load_pipeline

    teacher, student = load_pipeline("tiny-sd", scheduler="default"), load_pipeline("tiny-lcm", scheduler="default")
    spec = HybridSpec("tiny-sd", "tiny-lcm", 2, 6, 3, 5.0, 8.0)
    prompts, seeds = ["a cat", "a red dog"], [0, 1]
    out = str(tmp_path / "h.zarr")
    plain = capture_hybrid(teacher, student, hybrid_plan(spec, prompts, seeds, batch_size=4), out, group="plain").group
    plan = hybrid_plan(spec, prompts, seeds, batch_size=4)
    plan.taps, plan.attention_maps = parse_taps(["mid_block"]), True
    tapped = capture_hybrid(teacher, student, plan, out, group="tapped").group
    a, b = store.open_group(out, plain).load(), store.open_group(out, tapped).load()
    for var in ("latent", "x0_pred", "model_output", "final_latent", "image"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    n_steps = b.sizes["step"]
    assert b["tap.mid_block"].dims[:2] == ("sample", "step") and b["attention"].dims[:2] == ("sample", "step")
    assert np.isfinite(b["attention"].values).all() and np.isfinite(b["tap.mid_block"].values).all()

    # the reference: mid_block's output of each UNet call in an uncaptured run of the same hybrid
    seen = []
    hooks = [u.mid_block.register_forward_hook(lambda m, a_, o, who=who: seen.append((who, o.detach().clone())))
             for who, u in (("teacher", teacher.unet), ("student", student.unet))]
    try:
        pipe = HybridPipeline(teacher, student, "pipelines")
        pipe.configure(plan.extra["hybrid"])
        gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
        pipe([p for p in prompts for _ in seeds], generator=gens, output_type="latent")
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == n_steps and [w for w, _ in seen] == ["teacher"] * 2 + ["student"] * (n_steps - 2), \
        [w for w, _ in seen]
    for step, (who, o) in enumerate(seen):
        want = o.chunk(2)[1] if o.shape[0] == 8 else o  # the teacher's CFG call: the conditional half
        np.testing.assert_array_equal(b["tap.mid_block"].isel(step=step).values, want.numpy(), err_msg=f"{who} {step}")


def test_a_hybrids_taps_need_the_conditional_branch_and_names_in_both_parts():
    from trajlab.capture.module_taps import preflight
    from trajlab.experiments.hybrid_plans import hybrid_plan
    from trajlab.models.hybrid import HybridSpec

    plan = hybrid_plan(HybridSpec("tiny-sd", "tiny-lcm", 2, 6, 3, 5.0, 8.0), ["a cat"], [0])
    plan.taps = parse_taps([{"name": "mid_block", "branch": "both"}])
    with pytest.raises(TapError, match="branch='both' on a hybrid pipeline"):
        preflight([plan])
    plan.taps = parse_taps(["mid_blok"])
    with pytest.raises(TapError, match="mid_block"):
        preflight([plan])
