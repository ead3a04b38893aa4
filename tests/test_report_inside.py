"""The report's patching map, diversity over t and stochastic-mechanics blocks, drawn from small planted results
(what trajlab.analysis.results / the demo's analyses write), and the analyses directory wiring."""
import numpy as np
import xarray as xr

from trajlab.analysis.io import save_dataset
from trajlab.analysis.patching import patching_map
from trajlab.analysis.results import analyses_results
from trajlab.experiments.patching import Side, _receiver_vars
from trajlab.report.blocks import Figures
from trajlab.report.diversity_t import diversity_t
from trajlab.report.patching import patching
from trajlab.report.stochastic import injection_blocks, unit_noise_blocks
from trajlab.verdicts.matching import pixel_pairwise

INFO = {"g-teacher": {"label": "micro-sd, 30 steps", "family": "micro-sd", "sampler": "DDIM", "steps": 30},
        "g-turbo": {"label": "micro-turbo, 2 steps", "family": "micro-turbo", "sampler": "Euler-A", "steps": 2}}


def _images(rng, spread, P=4, S=8):
    base = rng.integers(60, 200, size=(P, 1, 8, 8, 3))
    return np.clip(base + rng.normal(0, spread, size=(P, S, 8, 8, 3)), 0, 255).astype(np.uint8)


def _da(x):
    return xr.DataArray(x, dims=("prompt", "seed", "y", "x", "rgb"),
                        coords={"prompt": [f"p{i}" for i in range(x.shape[0])], "seed": np.arange(x.shape[1])})


def planted_map():
    rng = np.random.default_rng(1)
    student, teacher = _images(rng, 5), _images(rng, 40)
    imgs = np.stack([np.stack([student, teacher]), np.stack([student, student])])  # (site, step, ...)
    ok = np.array([[True, True], [True, False]])
    cells = xr.Dataset({"images": (("site", "step", "prompt", "seed", "y", "x", "rgb"), imgs),
                        "applicable": (("site", "step"), ok),
                        "why": (("site", "step"), np.array([["", ""], ["", "not this one"]]))},
                       coords={"site": ["mid_block", "latent"], "step": [0, 1], "prompt": [f"p{i}" for i in range(4)],
                               "seed": np.arange(8)})
    m = patching_map(cells, _da(student), _da(teacher), pairwise=pixel_pairwise, metric="pixels")
    m = _receiver_vars(m, Side("micro-turbo", "euler-ancestral-trailing", 2, 0.0), np.array([999.0, 499.0]),
                       np.array([14.6, 1.0]), np.array([0, 14]), np.linspace(958, 1, 30), np.geomspace(9, 0.03, 30), 2)
    ds = xr.concat([m], dim="receiver", combine_attrs="drop").assign_coords(receiver=["micro-turbo"])
    return ds.assign_attrs(donor="micro-sd", donor_label="micro-sd ddim 30 steps cfg 4", metric="pixels",
                           n_prompts=4, n_seeds=8, seconds=1.0, matching="nearest log sigma", interval="jackknife",
                           prompts_as="sample")


def injections(steps, n_inj, share):
    total = 10.0
    inj = np.full((2, n_inj), total * (1 - share) / n_inj)
    return xr.Dataset({"pred_trace_initial": ("prompt", [total * share] * 2),
                       "pred_trace_injected": (("prompt", "injection"), inj),
                       "emp_trace": ("prompt", [9.0, 11.0]), "pred_trace": ("prompt", [total] * 2),
                       "share_initial": ("prompt", [share] * 2), "share_injected": ("prompt", [1 - share] * 2),
                       "trace_ratio": ("prompt", [0.9, 1.1]), "trace_ratio_initial_only": ("prompt", [9 / share / 10] * 2),
                       "replay_rel_error": ("prompt", [1e-7, 2e-7]), "n_samples": ("prompt", [16, 16])},
                      attrs={"steps": steps, "method": "dense", "n_points": 1})


def contraction(steps, ins, fro2):
    return xr.Dataset({"whole_fro2": ("sample", [fro2]), "whole_fro2_se": ("sample", [fro2 / 10]),
                       "whole_fro2_unit_noise": ("sample", [fro2 * ins**2]),
                       "whole_fro2_unit_noise_se": ("sample", [fro2 * ins**2 / 10]),
                       "replay_rel_error": ("sample", [1e-7])}, attrs={"steps": steps, "init_noise_sigma": ins})


def test_patching_section_draws_the_map_and_says_the_largest_restoration(tmp_path):
    fig = Figures(tmp_path, INFO, "g-teacher")
    blocks = patching({"patching": {"micro-sd patching": planted_map()}}, fig)
    kinds = [b["kind"] for b in blocks]
    assert kinds.count("fig") == 1 and "table" in kinds
    text = " ".join(b.get("text", "") for b in blocks)
    assert "Largest restoration with the accuracy kept" in text and "mid_block at step 1" in text
    assert "1.00 [1.00, 1.00] of the gap" in text
    assert "Not run: not this one." in text
    table = next(b for b in blocks if b["kind"] == "table")
    assert len(table["rows"]) == 3  # the applicable cells only
    assert (tmp_path / next(b for b in blocks if b["kind"] == "fig")["src"]).stat().st_size > 5000
    assert patching({}, fig)[0]["kind"] == "none"


def test_stochastic_blocks_compare_per_unit_noise_sd(tmp_path):
    fig = Figures(tmp_path, INFO, "g-teacher")
    blocks = unit_noise_blocks({"g-teacher": contraction(30, 1.0, 86.0), "g-turbo": contraction(2, 14.6, 0.078)}, fig)
    table = next(b for b in blocks if b["kind"] == "table")
    col = table["head"].index("fro_unit")
    vals = {r[0]: float(r[col]) for r in table["rows"]}
    assert abs(vals["micro-sd, 30 steps"] - np.sqrt(86.0)) < 0.01
    assert abs(vals["micro-turbo, 2 steps"] - 14.6 * np.sqrt(0.078)) < 0.01  # 4.08: sigma_init x raw norm
    blocks = injection_blocks({"g-turbo": injections(2, 2, 0.39)}, fig)
    assert [b["kind"] for b in blocks] == ["p", "table", "fig"]
    row = blocks[1]["rows"][0]
    assert row[blocks[1]["head"].index("share_initial")] == "0.39"
    assert injection_blocks({}, fig) == [] and unit_noise_blocks({}, fig) == []


def test_diversity_over_t_section(tmp_path):
    fig = Figures(tmp_path, INFO, "g-teacher")
    res = {}
    for g, k, top in (("g-teacher", 5, 0.3), ("g-turbo", 2, 0.1)):
        sig = np.geomspace(14.6, 0.05, k)
        y = np.linspace(0.01, top, k)
        res[g] = xr.Dataset({"pixel_diversity": ("step", y), "pixel_diversity_ci_low": ("step", y * 0.9),
                             "pixel_diversity_ci_high": ("step", y * 1.1)},
                            coords={"step": np.arange(k), "sigma": ("step", sig)},
                            attrs={"interval": "crossed jackknife", "perceptual_metric": ""})
    blocks = diversity_t({"diversity_t": res}, fig)
    assert [b["kind"] for b in blocks] == ["p", "fig", "table"]
    assert diversity_t({}, fig)[0]["kind"] == "none"


def test_analyses_dir_feeds_the_new_results(tmp_path):
    save_dataset(injections(4, 3, 0.1), tmp_path / "g_noise_injections.nc", attrs={"group": "g-dmd"})
    save_dataset(planted_map(), tmp_path / "micro-sd_patching.nc", attrs={"group": "micro-sd patching"})
    r = analyses_results(tmp_path)
    assert list(r["noise_injections"]) == ["g-dmd"] and list(r["patching"]) == ["micro-sd patching"]
    assert "summary" in r["analyses_files"] and r["analyses_files"].sizes.get("file", 0) == 0


def test_covariance_results_plain_false_writes_only_the_injected_propagation(tmp_path):
    """What the demo runs for micro-turbo and micro-dmd: covariance_results(injections=True, plain=False) writes
    <group>_noise_injections.nc only (its trace_ratio_initial_only is the plain x_T-only ratio)."""
    from diffusers import LCMScheduler

    from trajlab.analysis.mechanistic import covariance_results
    from trajlab.capture import CapturePlan, capture
    from trajlab.models.exact import build_exact_world

    pipe = build_exact_world("gauss-8d")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    plan = CapturePlan(model="exact:gauss-8d", prompts=["p0"], seeds=list(range(12)), scheduler="lcm", steps=4,
                       guidance=1.0, images=False, batch_size=12)
    res = capture(pipe, plan, tmp_path / "s.zarr", progress=False)
    written = covariance_results(str(tmp_path / "s.zarr"), tmp_path / "out", n_components=4, injections=True,
                                 plain=False)
    assert [p.name for p in written] == [f"{res.group}_noise_injections.nc"]
    inj = analyses_results(tmp_path / "out")["noise_injections"][res.group]
    assert 0 < float(inj["share_initial"].mean()) < 1 and inj.sizes["injection"] == 3
