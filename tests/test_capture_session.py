"""The Python capture API: ``with trajlab.capture(pipe, path) as run: pipe(...)`` records the researcher's own calls
into the CLI's store, bit for bit what ``trajlab capture`` writes; the calls return what they return without it;
re-running resumes; calls that cannot be recorded are refused before they run."""

import numpy as np
import pytest
import torch

import trajlab
from trajlab import store
from trajlab.capture import CapturePlan
from trajlab.capture.run import capture as plan_capture
from trajlab.capture.session import SessionError, scheduler_name
from trajlab.models.schedulers import make_scheduler

STEPS, GUIDANCE = 3, 3.0


@pytest.fixture()
def pipe(tiny_sd, tiny_sd_base_config):
    tiny_sd.scheduler = make_scheduler("ddim", tiny_sd_base_config)
    return tiny_sd


def call(pipe, prompt, seeds, output_type="np", **kw):
    return pipe([prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32, output_type=output_type, **kw)


def arrays(path, group):
    ds = store.open_group(path, group).load()
    return {v: ds[v].values for v in ds.data_vars if v != "checksum"}


def test_trajlab_capture_is_callable_whatever_was_imported_first():
    import importlib

    import trajlab.capture.run  # noqa: F401 - sets trajlab.capture to the package, which must stay callable

    assert callable(trajlab.capture) and callable(importlib.import_module("trajlab.capture"))
    assert trajlab.capture.CapturePlan is CapturePlan


def test_recorded_calls_return_what_they_return_and_store_what_the_cli_stores(pipe, tmp_path):
    plain = call(pipe, "a cat", [0, 1], output_type="pil").images
    with trajlab.capture(pipe, tmp_path / "api.zarr", model="tiny-sd") as run:
        inside = call(pipe, "a cat", [0, 1], output_type="pil").images
    from diffusers import StableDiffusionPipeline

    assert type(pipe) is StableDiffusionPipeline, "the pipeline's own class is back after the with block"
    assert "step" not in vars(pipe.scheduler)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, inside))
    (res,) = run.results
    assert res.samples_written == 2 and res.n_complete == 2
    plan = CapturePlan(model="tiny-sd", prompts=["a cat"], seeds=[0, 1], scheduler="ddim", steps=STEPS,
                       guidance=GUIDANCE, height=32, width=32, batch_size=2)
    cli = plan_capture(pipe, plan, tmp_path / "cli.zarr", progress=False)
    got, want = arrays(tmp_path / "api.zarr", res.group), arrays(tmp_path / "cli.zarr", cli.group)
    assert set(got) == set(want)
    for v in want:  # images too: PIL bytes = the CLI's rounding of the np output
        np.testing.assert_array_equal(got[v], want[v], err_msg=v)
    attrs = store.decode_attrs(run.open().attrs)
    assert attrs["config"]["extra"]["api"] == "python" and attrs["config"]["scheduler"] == "ddim"
    assert scheduler_name(pipe.scheduler) == "ddim"


def test_a_rerun_resumes_into_the_store_an_uninterrupted_run_writes(pipe, tmp_path):
    def session(path, calls, **kw):
        with trajlab.capture(pipe, path, model="tiny-sd", prompts=["a cat", "a dog"], **kw) as run:
            outs = [call(pipe, p, [0, 1]).images for p in calls]
        return run, outs

    whole, outs = session(tmp_path / "a.zarr", ["a cat", "a dog"])
    session(tmp_path / "b.zarr", ["a cat"])  # interrupted after its first call
    again, outs_b = session(tmp_path / "b.zarr", ["a cat", "a dog"])
    assert [r.samples_written for r in again.results] == [0, 2], "the complete call is not re-written"
    for x, y in zip(outs, outs_b):
        np.testing.assert_array_equal(x, y)  # a complete call still returns its images
    (g,) = store.group_names(tmp_path / "a.zarr")
    assert store.group_names(tmp_path / "b.zarr") == [g]
    a, b = arrays(tmp_path / "a.zarr", g), arrays(tmp_path / "b.zarr", g)
    for v in a:
        np.testing.assert_array_equal(a[v], b[v], err_msg=v)
    # a later call with new seeds grows the group; taps and attention maps come along
    with trajlab.capture(pipe, tmp_path / "c.zarr", model="tiny-sd", taps=["mid_block"], attention_maps=True) as run:
        call(pipe, "a cat", [0, 1])
        call(pipe, "a cat", [2, 3])
        with pytest.raises(SessionError, match="declare every prompt"):
            call(pipe, "a dog", [0, 1])
    ds = run.open().load()
    assert list(ds.seed.values) == [0, 1, 2, 3] and bool(ds.complete.all())
    assert ds["tap.mid_block"].shape[:2] == (4, STEPS) and ds.attention.dims == ("sample", "step", "token", "y", "x")
    np.testing.assert_array_equal(ds.latent.values[:2], arrays(tmp_path / "a.zarr", g)["latent"][:2])


def test_calls_that_cannot_be_recorded_are_refused_before_they_run(pipe, tmp_path):
    path = tmp_path / "s.zarr"
    used = torch.Generator().manual_seed(3)
    torch.randn(1, generator=used)
    bad = [dict(prompt=["a cat", "a cat"], generator=torch.Generator().manual_seed(0)),  # one generator, 2 images
           dict(prompt="a cat", generator=used),
           dict(prompt="a cat", generator=None),
           dict(prompt=["a cat", "a dog"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)]),  # not crossed
           dict(prompt="a cat", generator=torch.Generator().manual_seed(0), latents=torch.zeros(1, 4, 16, 16))]
    with trajlab.capture(pipe, path) as run:
        for kw in bad:
            with pytest.raises(SessionError):
                pipe(num_inference_steps=STEPS, height=32, width=32, output_type="np", **kw)
    assert not run.results and not path.exists()
    assert type(pipe).__mro__[1].__name__ == "DiffusionPipeline" and "step" not in vars(pipe.scheduler)
