"""Trajectories of exact-world pipelines recorded through the real capture layer (for theory tests)."""

from trajlab.capture import CapturePlan
from trajlab.capture.run import capture_dataset


def exact_trajectories(pipe, n_prompts: int = 1, n_seeds: int = 8, num_inference_steps: int = 10):
    """Capture ``n_prompts x n_seeds`` samples (seeds 0..n_seeds-1, prompt-major) into an in-memory Dataset."""
    name = getattr(pipe.unet, "world_name", None) or "custom"
    plan = CapturePlan(model=f"exact:{name}", prompts=[f"p{i}" for i in range(n_prompts)], seeds=list(range(n_seeds)),
                       scheduler="default", steps=num_inference_steps, guidance=1.0, images=False,
                       batch_size=n_prompts * n_seeds)
    return capture_dataset(pipe, plan)
