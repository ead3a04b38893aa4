"""Sweeps: matching, step consistency, negative-prompt sensitivity, image statistics (synthetic groups)."""
import json

import numpy as np
import pytest
import xarray as xr

from trajlab.analysis import sweeps as S


def group(images, steps=4, seeds=(0, 1, 2), prompts=("p0", "p1"), guidance=5.0, neg=None, model="tiny-sd",
          sched="DDIMScheduler", extra=None):
    """A minimal store-group Dataset (prompt-major samples) holding ``images`` (n, 8, 8, 3) uint8."""
    n = len(prompts) * len(seeds)
    images = np.asarray(images, dtype=np.uint8)
    assert images.shape[0] == n
    lat = images[..., :1].transpose(0, 3, 1, 2).astype(np.float32) / 255
    return xr.Dataset(
        {"image": (("sample", "height", "width", "rgb"), images),
         "final_latent": (("sample", "channel", "y", "x"), lat),
         "x0_pred": (("sample", "step", "channel", "y", "x"), np.repeat(lat[:, None], steps, 1)),
         "complete": ("sample", np.ones(n, bool)),
         "prompt_text": ("prompt", np.array(prompts, dtype=object))},
        coords={"seed": ("sample", np.tile(seeds, len(prompts))),
                "prompt_index": ("sample", np.repeat(np.arange(len(prompts)), len(seeds))),
                "sigma": ("step", np.linspace(10, 0.1, steps))},
        attrs={"model": model, "scheduler_class": sched, "steps": steps, "guidance": guidance,
               "negative_prompt": neg or "", "loras": "[]", "extra": json.dumps(extra or {})})


rng = np.random.default_rng(0)
BASE = rng.integers(0, 256, (6, 8, 8, 3))


def test_output_distance_zero_for_identical_and_exact_rms_otherwise():
    a = group(BASE)
    assert float(S.output_distance(a, group(BASE)).max()) == 0.0
    shifted = np.clip(BASE + 10, 0, 255)
    d = S.output_distance(a, group(shifted))
    expect = np.sqrt((((shifted - BASE) / 255.0) ** 2).reshape(6, -1).mean(1))
    np.testing.assert_allclose(d.values, expect)
    assert d.attrs["var"] == "image"


def test_matching_on_prompt_and_seed_not_position():
    a = group(BASE, seeds=(0, 1, 2))
    perm = [2, 1, 0, 5, 4, 3]  # the same samples listed with seeds reversed
    b = group(BASE[perm], seeds=(2, 1, 0))
    assert float(S.output_distance(a, b).max()) == 0.0
    c = group(BASE, seeds=(7, 8, 9))
    with pytest.raises(ValueError, match="share no complete"):
        S.output_distance(a, c)


def test_step_consistency_zero_for_identical_outputs_and_positive_otherwise():
    same = S.step_consistency({"g2": group(BASE, steps=2), "g4": group(BASE, steps=4), "g8": group(BASE, steps=8)})
    assert set(same["group"].values) == {"g2", "g4", "g8"}
    assert np.all(same["distance_to_final"].values == 0)
    changed = S.step_consistency({"g2": group(255 - BASE, steps=2), "g8": group(BASE, steps=8)})
    assert float(changed["distance_to_final"].sel(group="g2")) > 0.1
    assert float(changed["distance_to_final"].sel(group="g8")) == 0.0
    assert str(changed["reference_group"].sel(group="g2").values) == "g8"
    # different guidance: not one steps family, nothing to compare
    none = S.step_consistency({"a": group(BASE, steps=2), "b": group(BASE, steps=4, guidance=2.0)})
    assert "group" not in none.dims and "note" in none.attrs


def test_negative_prompt_sensitivity_pairs_with_and_without():
    res = S.negative_prompt_sensitivity({"plain": group(BASE), "neg": group(np.clip(BASE + 20, 0, 255), neg="blur"),
                                         "other": group(BASE, guidance=2.0, neg="blur")})
    assert list(res["group"].values) == ["neg"]
    assert str(res["reference_group"].values[0]) == "plain" and float(res["sensitivity"][0]) > 0


def test_image_stats_and_diversity():
    grey = np.full((6, 8, 8, 3), 128)
    white = np.full((6, 8, 8, 3), 255)
    assert float(S.image_stats(group(grey))["saturation"].max()) < 0.01
    np.testing.assert_allclose(S.image_stats(group(white))["saturation"].values, 0.5)
    assert float(S.image_stats(group(grey))["colourfulness"].max()) == 0.0
    assert float(S.pixel_diversity(group(grey)).max()) == 0.0
    assert float(S.pixel_diversity(group(BASE)).min()) > 0.1


def test_cfg_curves_family_and_describe_roles():
    groups = {"g1": group(BASE // 4 + 96, guidance=1.0), "g7": group(BASE, guidance=7.5),
              "s": group(BASE, model="tiny-lcm", sched="LCMScheduler", steps=4),
              "h": group(BASE, extra={"hybrid": {"handoff_step": 1}})}
    d = S.describe_all(groups)
    assert [d[k]["role"] for k in ("g1", "s", "h")] == ["teacher", "student", "hybrid"]
    cur = S.cfg_curves(groups)
    assert sorted(cur["group"].values) == ["g1", "g7"]
    assert float(cur["saturation"].sel(group="g7")) > float(cur["saturation"].sel(group="g1"))


def test_label_accuracy_with_a_stub_labeller():
    g = group(BASE, prompts=("a handwritten digit 3", "a handwritten digit 5"))
    acc = S.label_accuracy(g, lambda imgs: (np.full(len(imgs), 3), None))
    np.testing.assert_allclose(acc.values, [1.0, 0.0])


def test_pick_teacher_prefers_default_guidance_and_more_samples_over_sweep_groups():
    """A guidance-sweep group (off the registry default) or a smaller group is never the reference."""
    base = {"role": "teacher", "has_images": True, "steps": 30, "negative_prompt": "", "model": "micro-sd"}
    desc = {"a_cfg12": {**base, "guidance": 12.0, "n_samples": 80},
            "b_cfg4_small": {**base, "guidance": 4.0, "n_samples": 80},
            "c_cfg4": {**base, "guidance": 4.0, "n_samples": 320},
            "d_neg": {**base, "guidance": 4.0, "n_samples": 640, "negative_prompt": "x"},
            "e_student": {**base, "role": "student", "steps": 50, "guidance": 4.0, "n_samples": 999}}
    assert S.pick_teacher(desc) == "c_cfg4"
    del desc["c_cfg4"], desc["b_cfg4_small"]
    assert S.pick_teacher(desc) == "a_cfg12"  # off-default still beats a negative-prompt group
    desc["f_more_steps"] = {**base, "steps": 50, "guidance": 1.0, "n_samples": 8}
    assert S.pick_teacher(desc) == "f_more_steps"  # steps first
