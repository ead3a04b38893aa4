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


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, request):
    """(output directory, report index.html) of one quick demo on tiny models (every stage, the mechanistic one
    included; 2 prompts x 3 seeds, the fewest that give crossed-design intervals), shared by the report tests
    (tests/test_report.py, tests/test_report_browser.py), which only read it. Built once per test run: under
    pytest-xdist the workers share one copy (the first to ask builds it under a file lock; the others wait)."""
    import fcntl

    from trajlab.experiments.demo import run_demo

    worker = getattr(request.config, "workerinput", None)
    root = tmp_path_factory.getbasetemp().parent if worker is not None else tmp_path_factory.getbasetemp()
    out, index = root / "tiny-demo", root / "tiny-demo" / "report" / "index.html"
    with open(root / "tiny-demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not index.is_file():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            assert run_demo(out, quick=True, tiny=True, teacher_steps=8, n_prompts=2, n_seeds=3, progress=False) == index
    return out, index
