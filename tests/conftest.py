"""Test setup: offline hub, few threads, shared tiny fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: per-op overhead dominates; avoids OpenMP oversubscription


@pytest.fixture(scope="session")
def tiny_sd():
    from trajlab.models.tiny import tiny_sd

    return tiny_sd()


@pytest.fixture(scope="session")
def tiny_sd_base_config(tiny_sd):
    return dict(tiny_sd.scheduler.config)
