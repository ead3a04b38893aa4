"""One configuration per group: batch size is part of the checked configuration; a shard, resume or
concurrent run that disagrees is refused in one line naming only the differing parameter(s), before any
model loads where the group exists; a sharded run ends saying whether its group is complete."""

import sys
from pathlib import Path

import numpy as np
import pytest

from trajlab import store
from trajlab.capture.plan import CapturePlan
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_store import _allocate  # noqa: E402

TINY = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:4"]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: refusals must come before."""
    import trajlab.experiments.plans as P

    def plan_pipeline(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(P, "plan_pipeline", plan_pipeline)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trajlab: error:") and "Traceback" not in err, err
    return err


def test_group_config_has_batch_size_and_the_group_name_does_not_change():
    a = CapturePlan(model="tiny-sd", prompts=["x"], seeds=[0], batch_size=2)
    b = CapturePlan(model="tiny-sd", prompts=["x"], seeds=[0], batch_size=4)
    assert a.group_config()["batch_size"] == 2 and "batch_size" not in a.config()
    assert a.group_name() == b.group_name(), "existing stores keep their group names"
    assert a.group_config() != b.group_config()
    assert "device" not in a.group_config(), "shards may run on different devices"


def test_check_config_names_only_real_differences(tmp_path):
    path = tmp_path / "s.zarr"
    _allocate(path, config={"steps": 3, "batch_size": 2, "extra": {"group": "g", "experiment": "x"}})
    store.check_config(path, "g", {"steps": 3, "batch_size": 2, "extra": {"experiment": "x"}})  # the name is no content
    store.check_config(path, "g", {"steps": 3, "batch_size": 2, "extra": {"group": "other", "experiment": "x"}})
    with pytest.raises(store.ConfigMismatch) as exc:
        store.check_config(path, "g", {"steps": 3, "batch_size": 4, "extra": {"group": "g", "experiment": "x"}})
    msg = str(exc.value)
    assert "batch_size: store has 2, asked 4" in msg and "extra" not in msg and "\n" not in msg
    with pytest.raises(store.ConfigMismatch, match=r"extra.experiment: store has 'x', asked 'y'"):
        store.check_config(path, "g", {"steps": 3, "batch_size": 2, "extra": {"experiment": "y"}})


def test_a_group_stored_before_batch_size_was_checked_still_resumes(tmp_path):
    path = tmp_path / "old.zarr"
    _allocate(path, config={"steps": 3, "extra": {}})
    store.check_config(path, "g", {"steps": 3, "batch_size": 8, "extra": {}})


def test_a_shard_with_another_batch_size_is_refused_before_any_model_loads(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.zarr"
    assert main([*TINY, "--batch-size", "2", "--group", "g", "--shard", "1/2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "group g: INCOMPLETE, 4/8 samples complete; incomplete blocks belong to shard(s) 0/2" in text, text
    import trajlab.experiments.plans as P

    monkeypatch.setattr(P, "plan_pipeline", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    assert main([*TINY, "--batch-size", "4", "--group", "g", "--shard", "0/2", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "batch_size: store has 2, asked 4" in err and "extra" not in err and "guidance" not in err, err
    monkeypatch.undo()
    assert main([*TINY, "--batch-size", "2", "--group", "g", "--shard", "0/2", "--out", str(out)]) == 0
    assert "group g: complete (8/8 samples)" in capsys.readouterr().out
    assert store.completed(out, "g").all()


def test_naming_a_derived_group_with_another_config_names_only_that_parameter(tmp_path, capsys, no_model_loads):
    out = tmp_path / "s.zarr"
    import trajlab.experiments.plans as P

    plans = P.expand_cell({"model": "tiny-sd", "steps": 3, "guidance": 4.0, "height": 32, "width": 32,
                           "batch_size": 8}, prompts=["a cat"], seeds=[0])
    derived = plans[0].group_name()
    _allocate(out, name=derived, config=plans[0].group_config())
    assert main([*TINY[:-4], "--prompt", "a cat", "--seeds", "0", "--guidance", "5", "--group", derived,
                 "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "guidance: store has 4.0, asked 5.0" in err and "extra" not in err, err


def test_a_group_allocated_by_another_process_meanwhile_is_checked_at_the_first_write(tmp_path, capsys, monkeypatch,
                                                                                        tiny_sd, tiny_sd_base_config):
    """Preflight saw no group; another process allocated it (batch size 2) before this run's first write
    (batch size 4): refused there in one line, nothing written."""
    from trajlab.capture import shard as _shard
    from trajlab.capture.run import capture
    from trajlab.models.schedulers import make_scheduler

    kw = dict(model="tiny-sd", prompts=["a cat", "a dog"], seeds=[0, 1], scheduler="ddim", steps=3, guidance=4.0,
              height=32, width=32, images=False)
    out = tmp_path / "s.zarr"
    tiny_sd.scheduler = make_scheduler("ddim", tiny_sd_base_config)
    first = capture(tiny_sd, CapturePlan(**kw, batch_size=2), out, group="g", progress=False, shard="1/2")
    assert first.n_complete == 2 and first.missing_shards == ("0/2",)
    before = store.completed(out, "g").copy()
    real_state = _shard.Coordinator.group_state
    monkeypatch.setattr(_shard.Coordinator, "group_state",
                        lambda self, group, n: (False, np.zeros(n, dtype=bool)))  # what it saw before the other began
    with pytest.raises(store.ConfigMismatch, match="batch_size: store has 2, asked 4"):
        capture(tiny_sd, CapturePlan(**kw, batch_size=4), out, group="g", progress=False)
    monkeypatch.setattr(_shard.Coordinator, "group_state", real_state)
    np.testing.assert_array_equal(store.completed(out, "g"), before)


def test_the_cli_prints_a_concurrent_refusal_as_one_line(tmp_path, capsys, monkeypatch):
    from trajlab.capture import shard as _shard

    out = tmp_path / "s.zarr"
    assert main([*TINY, "--batch-size", "2", "--group", "g", "--no-images", "--out", str(out)]) == 0
    capsys.readouterr()
    import trajlab.experiments.plans as P

    monkeypatch.setattr(P, "preflight", lambda plans, out: None)  # started before the group existed
    monkeypatch.setattr(_shard.Coordinator, "group_state", lambda self, group, n: (False, np.zeros(n, dtype=bool)))
    assert main([*TINY, "--batch-size", "4", "--group", "g", "--no-images", "--out", str(out)]) == 2
    assert "batch_size: store has 2, asked 4" in _one_line(capsys)
