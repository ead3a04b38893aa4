"""Real-network nulls: the shipped micro-world teacher against itself on disjoint seed blocks, and against its own
weights under another deterministic sampler (TCD gamma 0) on the same prompts and seeds. Nothing differs in
distribution, so no failure may be supported (the old engine supported diversity collapse and mode dropping)."""

import numpy as np
import pytest

from trajlab.experiments.demo_design import micro_available

pytestmark = pytest.mark.skipif(not micro_available(), reason="micro-world weights (data/micro) not present")


def test_micro_teacher_nulls_support_no_failure(tmp_path):
    from trajlab.verdicts.engine import MIN_SEEDS
    from trajlab.verdicts.nulls import PAIR_MODES, capture_real_nulls

    ds = capture_real_nulls(tmp_path / "nulls.zarr", n_prompts=4, n_seeds=MIN_SEEDS, steps=10)
    cands = set(ds["candidate"].values.tolist())
    assert cands == {"null block", "tcd gamma 0"}, cands
    assert set(ds["mode"].values.tolist()) == set(PAIR_MODES)
    dec = ds["decision"].values
    assert not (dec == "supported").any(), ds[["mode", "candidate", "estimate", "ci_low", "ci_high", "decision"]]
    # the comparisons were made, not skipped: diversity has a finite effect and a CI on both nulls
    div = ds["mode"].values == "diversity_collapse"
    assert np.isfinite(ds["ci_low"].values[div].astype(float)).all()
    assert "micro-LPIPS" in str(ds.attrs["diversity_features"])
