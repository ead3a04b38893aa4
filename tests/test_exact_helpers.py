"""The theory tests' trajectory helper reads what capture_dataset reads (its faster path changes no value)."""
from exact_helpers import exact_trajectories

from trajlab.capture import CapturePlan
from trajlab.capture.run import capture_dataset
from trajlab.models.exact import build_exact_world


def test_exact_trajectories_equal_capture_dataset():
    pipe = build_exact_world("gauss-8d")
    got = exact_trajectories(pipe, n_prompts=2, n_seeds=3, num_inference_steps=3)
    plan = CapturePlan(model="exact:gauss-8d", prompts=["p0", "p1"], seeds=[0, 1, 2], scheduler="default", steps=3,
                       guidance=1.0, images=False, batch_size=6)
    want = capture_dataset(pipe, plan)
    assert got.sizes["sample"] == 6 and "x0_pred" in got and got["x0_pred"].chunks is None  # in memory
    assert got.equals(want)  # every variable and coordinate, values and dims
    assert {k: v for k, v in got.attrs.items() if k != "created"} == {k: v for k, v in want.attrs.items() if k != "created"}
