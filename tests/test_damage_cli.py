"""Damage detected and named through the CLI, with a model (tiny-sd): a truncated chunk, a deleted chunk, a
deleted array or group ``zarr.json`` in a captured store. ``info --verify`` names group, variable and samples
(exit 1); ``report`` refuses a missing chunk in one line before any analysis and names a chunk the analyses
cannot read; re-running the capture re-writes the damaged samples into the store an undamaged run wrote."""

import shutil
import sys
from pathlib import Path

import pytest

from trajlab import store
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_sharding import assert_same_store  # noqa: E402

ARGS = ["capture", "--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet",
        "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:4", "--batch-size", "2", "--group", "g"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def _chunk(path, var, sample) -> Path:
    files = [p for p in (path / "g" / var / "c" / str(sample)).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


def _truncate(path):
    f = _chunk(path, "latent", 3)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_chunk(path):
    _chunk(path, "x0_pred", 5).unlink()


def _delete_array_meta(path):
    (path / "g" / "model_output" / "zarr.json").unlink()


def _delete_group_meta(path):
    (path / "g" / "zarr.json").unlink()


# (fault, the verify line's words, samples re-captured by the re-run)
FAULTS = {
    "truncated-chunk": (_truncate, ["DAMAGED group g, latent: chunk unreadable, truncated or corrupt", "(samples 3)"], 2),
    "deleted-chunk": (_delete_chunk, ["DAMAGED group g, x0_pred: chunk missing", "(samples 5)"], 2),
    "deleted-array-zarr.json": (_delete_array_meta, ["DAMAGED group g, model_output: metadata (zarr.json) lost"], 0),
    "deleted-group-zarr.json": (_delete_group_meta, ["DAMAGED group g, (group): metadata (zarr.json) lost"], 0),
}


@pytest.fixture
def damaged(reference, tmp_path, request):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    FAULTS[request.param][0](path)
    return path


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if not x.startswith("trajlab: note:")]
    assert len(lines) == 1 and lines[0].startswith("trajlab: error:") and "Traceback" not in err, err
    return lines[0]


def test_info_verify_on_an_intact_store(reference, capsys):
    assert main(["info", "--verify", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "verify: 8 complete sample(s) in 1 group(s): every chunk read, every checksum matches" in out
    assert main(["info", "--verify", f"{reference}/g"]) == 0


@pytest.mark.parametrize("damaged", list(FAULTS), indirect=True)
def test_damage_is_named_and_the_capture_rerun_rewrites_it(damaged, reference, request, capsys):
    fault = request.node.callspec.params["damaged"]
    _, words, redone = FAULTS[fault]
    assert main(["info", str(damaged)]) == 0, "plain info still lists the store"
    capsys.readouterr()
    assert main(["info", "--verify", str(damaged)]) == 1
    out, err = capsys.readouterr()
    line = next(x for x in out.splitlines() if x.startswith("verify: DAMAGED"))
    for w in words:
        assert w in line, (w, out)
    assert "re-running the capture that wrote it re-writes the damaged samples" in _one_error_line(err)
    assert main([*ARGS, "--out", str(damaged)]) == 0
    out, err = capsys.readouterr()
    assert f"captured {redone} samples ({8 - redone} already complete)" in out, out
    assert "trajlab: note:" in err and len(err.strip().splitlines()) == 1, err
    assert_same_store(reference, damaged)
    assert main(["info", "--verify", str(damaged)]) == 0


@pytest.mark.parametrize("damaged", ["deleted-chunk"], indirect=True)
def test_report_refuses_a_missing_chunk_before_any_analysis(damaged, tmp_path, monkeypatch, capsys):
    import trajlab.experiments.reporting as reporting

    monkeypatch.setattr(reporting, "report_store", lambda *a, **k: pytest.fail("analysed a damaged store"))
    assert main(["report", str(damaged), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "damaged data: group g, x0_pred: chunk missing" in line and "(samples 5)" in line
    from trajlab.analysis.io import open_groups

    with pytest.raises(store.StoreError, match=r"group g, x0_pred: chunk missing .*samples 5"):
        open_groups(str(damaged), variables=["x0_pred"], complete_only=True)


@pytest.mark.parametrize("damaged", ["truncated-chunk"], indirect=True)
def test_report_names_a_chunk_the_analyses_cannot_read(damaged, tmp_path, monkeypatch, capsys):
    import trajlab.experiments.reporting as reporting
    from trajlab.analysis.io import open_groups

    def analyse(path, *a, **k):  # what every analysis does: read the samples
        open_groups(path, variables=["latent"], complete_only=True, load=True)

    monkeypatch.setattr(reporting, "report_store", analyse)
    assert main(["report", str(damaged), "--out", str(tmp_path / "r")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "group g, latent: chunk unreadable, truncated or corrupt" in line and "(samples 3)" in line


def test_a_deleted_root_zarr_json_is_one_line_and_the_capture_rerun_rebuilds_it(reference, tmp_path, capsys):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    (path / "zarr.json").unlink()
    for argv in (["info", str(path)], ["info", "--verify", str(path)]):
        assert main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert "root zarr.json is missing" in line and "holds groups g" in line and "re-run the capture" in line, line
    assert (path / "g" / "latent" / "zarr.json").exists(), "nothing was removed"
    assert main([*ARGS, "--out", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "captured 0 samples (8 already complete)" in out, out
    assert "root zarr.json was lost: rebuilt from the groups' own metadata, listing g" in err, err
    assert_same_store(reference, path)
    assert main(["info", "--verify", str(path)]) == 0


def test_a_hybrid_group_never_writes_its_cfg_halves_and_that_is_no_damage(tmp_path):
    """A hybrid's student steps have no CFG halves, so the writer never writes model_output_uncond/cond: verify
    finds nothing and a re-run re-captures nothing (no endless repair loop)."""
    from test_hybrid import capture_hybrid

    from trajlab.experiments.hybrid_plans import hybrid_plan
    from trajlab.models.hybrid import HybridSpec
    from trajlab.models.loading import load_pipeline

    teacher, student = load_pipeline("tiny-sd", scheduler="default"), load_pipeline("tiny-lcm", scheduler="default")
    plan = hybrid_plan(HybridSpec("tiny-sd", "tiny-lcm", 2, 6, 3, 5.0, 8.0), ["a cat"], [0, 1])
    out = str(tmp_path / "h.zarr")
    group = capture_hybrid(teacher, student, plan, out).group
    import zarr

    from trajlab.store_fs import stored_chunks

    assert "model_output_uncond" in store.open_group(out, group)
    assert not stored_chunks(zarr.open_group(out, mode="r")[group]["model_output_uncond"])
    assert store.verify(out) == []
    again = capture_hybrid(teacher, student, plan, out)
    assert again.samples_written == 0 and again.samples_skipped == 2
