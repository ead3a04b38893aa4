"""Every bad input is one line, before work: a table of bad TOML values, flags, files, devices and outputs,
each run through the CLI (in process, with model loading forbidden) and asserted to exit 2 with one
``trajlab: error:`` line naming the problem, no traceback, nothing written, in well under the time a model
takes to load; a sample of them again through ``python -m trajlab``; the plan parser's own checks."""

import os
import subprocess
import sys
import time

import pytest

from trajlab.capture.plan import CapturePlan, PlanError
from trajlab.cli import main
from trajlab.experiments import plans as P

BASE_TOML = 'model = "tiny-sd"\nsteps = 3\nheight = 32\nwidth = 32\nprompts = ["a cat"]\nseeds = "0:2"\n'
FLAGS = ["--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--prompt", "a cat", "--seeds", "0:2",
         "--quiet"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _toml(line: str, base: str = BASE_TOML):
    """A capture --config case: BASE_TOML with ``line`` overriding (a key given twice is malformed TOML)."""
    key = line.split("=")[0].strip()
    kept = "".join(x + "\n" for x in base.splitlines() if x.split("=")[0].strip() != key)
    return ("toml", kept + line + "\n")


# (id, case, words the one line must hold); a case is ("toml", text) | ("flags", [...]) | ("report", [...])
CASES = [
    # TOML values of the wrong type
    ("toml-guidance-str", _toml('guidance = "4"'), ["guidance='4'", "finite number", "got a string"]),
    ("toml-batch-str", _toml('batch_size = "2"'), ["batch_size='2'", "got a string"]),
    ("toml-height-str", _toml('height = "32"'), ["height='32'", "got a string"]),
    ("toml-prompts-str", _toml('prompts = "a cat"'), ["prompts='a cat'", "list of strings"]),
    ("toml-images-str", _toml('images = "no"'), ["images='no'", "true or false"]),
    ("toml-images-int", _toml("images = 1"), ["images=1", "true or false"]),
    ("toml-steps-str", _toml('steps = "3"'), ["steps='3'", "got a string"]),
    ("toml-steps-float", _toml("steps = 3.5"), ["steps=3.5", "integer"]),
    ("toml-steps-bool", _toml("steps = true"), ["steps=True", "got a boolean"]),
    ("toml-model-int", _toml("model = 3"), ["model=3", "model name"]),
    ("toml-model-empty", _toml('model = ""'), ["model=''", "model name"]),
    ("toml-scheduler-int", _toml("scheduler = 5"), ["scheduler=5"]),
    ("toml-negative-int", _toml("negative_prompt = 3"), ["negative_prompt=3", "a string"]),
    ("toml-loras-int", _toml("loras = 3"), ["loras=3"]),
    ("toml-prompts-ints", _toml("prompts = [1, 2]"), ["prompts=[1, 2]", "list of strings"]),
    ("toml-guidance-list-mixed", _toml('guidance = [1.0, "x"]'), ["guidance=[1.0, 'x']", "'x'"]),
    ("toml-guidance-list-empty", _toml("guidance = []"), ["guidance=[]", "non-empty list"]),
    ("toml-run-str", _toml('run = "x"'), ["run = 'x'", "[[run]] tables"]),
    ("toml-run-ints", _toml("run = [1, 2]"), ["[[run]] tables"]),
    ("toml-out-int", _toml("out = 3"), ["out=3", "store path"]),
    # NaN, inf, zero, negative
    ("toml-guidance-nan", _toml("guidance = nan"), ["guidance=nan", "finite number >= 0"]),
    ("toml-guidance-inf", _toml("guidance = inf"), ["guidance=inf", "finite"]),
    ("toml-guidance-neg", _toml("guidance = -1.0"), ["guidance=-1.0", ">= 0"]),
    ("toml-steps-zero", _toml("steps = 0"), ["steps=0", ">= 1"]),
    ("toml-steps-neg", _toml("steps = -2"), ["steps=-2", ">= 1"]),
    ("toml-batch-zero", _toml("batch_size = 0"), ["batch_size=0", ">= 1"]),
    ("toml-batch-neg", _toml("batch_size = -1"), ["batch_size=-1", ">= 1"]),
    ("toml-batch-bool", _toml("batch_size = true"), ["batch_size=True", "got a boolean"]),
    ("toml-width-33", _toml("width = 33"), ["width=33", "multiple of 8"]),
    ("toml-height-zero", _toml("height = 0"), ["height=0"]),
    # seeds
    ("toml-seed-2**64", _toml("seeds = 18446744073709551616"), ["18446744073709551616", "[0, 2**63)"]),
    ("toml-seed-range-2**64", _toml('seeds = "0:18446744073709551617"'), ["out of range"]),
    ("toml-seed-neg", _toml("seeds = -1"), ["seed -1 is out of range"]),
    ("toml-seed-bool", _toml("seeds = true"), ["seeds=True"]),
    ("toml-seed-float", _toml("seeds = 1.5"), ["seeds=1.5"]),
    ("toml-seed-empty", _toml("seeds = []"), ["selects no seeds"]),
    ("toml-seed-huge-range", _toml('seeds = "0:99999999999"'), ["at most"]),
    # names, devices, pipelines
    ("toml-dtype", _toml('dtype = "fp8"'), ["dtype='fp8'"]),
    ("toml-device-banana", _toml('device = "banana"'), ["'banana'", "cpu, cuda"]),
    ("toml-group-escape", _toml('group = "../escape"'), ["group name '../escape'"]),
    ("toml-group-empty", _toml('group = ""'), ["group name ''", "empty"]),
    ("toml-lcm-negative", _toml('negative_prompt = "blurry"', BASE_TOML.replace("tiny-sd", "tiny-lcm")),
     ["takes no negative prompt"]),
    # flags
    ("flag-batch-zero", ("flags", ["--batch-size", "0"]), ["--batch-size 0", ">= 1"]),
    ("flag-batch-neg", ("flags", ["--batch-size", "-3"]), ["--batch-size -3"]),
    ("flag-threads-zero", ("flags", ["--threads", "0"]), ["--threads 0", ">= 1"]),
    ("flag-threads-neg", ("flags", ["--threads", "-1"]), ["--threads -1"]),
    ("flag-guidance-nan", ("flags", ["--guidance", "nan"]), ["guidance=nan", "finite"]),
    ("flag-guidance-inf", ("flags", ["--guidance", "inf"]), ["guidance=inf", "finite"]),
    ("flag-guidance-neg", ("flags", ["--guidance", "-1"]), ["guidance=-1.0"]),
    ("flag-steps-zero", ("flags", ["--steps", "0"]), ["steps=0"]),
    ("flag-height-33", ("flags", ["--height", "33"]), ["height=33", "multiple of 8"]),
    ("flag-seed-2**64", ("flags", ["--seeds", "18446744073709551616"]), ["[0, 2**63)"]),
    ("flag-seed-2**63", ("flags", ["--seeds", "9223372036854775808"]), ["[0, 2**63)"]),
    ("flag-seed-range-2**64", ("flags", ["--seeds", "18446744073709551610:18446744073709551620"]), ["out of range"]),
    ("flag-seed-neg", ("flags", ["--seeds", "-1"]), ["seed -1 is out of range"]),
    ("flag-device-banana", ("flags", ["--device", "banana"]), ["'banana'", "cpu, cuda"]),
    ("flag-device-cuda", ("flags", ["--device", "cuda"]), ["--device cuda", "not available"]),
    ("flag-device-cuda-99", ("flags", ["--device", "cuda:99"]), ["cuda:99"]),
    ("flag-group-escape", ("flags", ["--group", "../escape"]), ["group name '../escape'", "path separator"]),
    ("flag-group-empty", ("flags", ["--group", ""]), ["group name ''"]),
    ("flag-group-dotdot", ("flags", ["--group", ".."]), ["group name '..'"]),
    ("flag-lcm-negative", ("flags", ["--model", "tiny-lcm", "--negative-prompt", "blurry"]), ["takes no negative"]),
    ("flag-prompts-not-utf8", ("flags", ["--prompts", "{latin1}"]), ["not UTF-8", "line 2"]),
    ("flag-prompts-missing", ("flags", ["--prompts", "{tmp}/nope.txt"]), ["no such file"]),
    ("flag-config-not-utf8", ("flags", ["--config", "{latin1_toml}"]), ["--config", "not UTF-8"]),
    ("flag-config-batch-zero", ("flags", ["--config", "{good_toml}", "--batch-size", "0"]), ["--batch-size 0"]),
    ("flag-env-threads", ("flags", ["ENV:TRAJLAB_THREADS=abc"]), ["TRAJLAB_THREADS='abc'"]),
    # exact-world recipes (issue 20: PSD covariances, matching shapes, finite values, dimension >= 1, UTF-8 files)
    ("world-cov-not-psd", ("flags", ["--model", 'exact:{{"means": [[0, 0]], "covs": [[[1, 2], [2, 1]]]}}']),
     ["covs[0] is not positive semi-definite", "smallest eigenvalue -1"]),
    ("world-cov-asymmetric", ("flags", ["--model", 'exact:{{"means": [[0, 0]], "covs": [[1, 0.5], [0.4, 1]]}}']),
     ["covs[0] is not symmetric"]),
    ("world-cov-shape", ("flags", ["--model", 'exact:{{"means": [[0, 0]], "covs": [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]}}']),
     ["covs has shape (1, 3, 3)", "expected (1, 2, 2)"]),
    ("world-weights-shape", ("flags", ["--model", 'exact:{{"means": [[0], [1]], "variances": 1, "weights": [1]}}']),
     ["weights has shape (1,)", "expected (2,)"]),
    ("world-means-ragged", ("flags", ["--model", 'exact:{{"means": [[0, 0], [1]], "variances": 1}}']), ["ragged"]),
    ("world-means-nan", ("flags", ["--model", 'exact:{{"means": [[0, NaN]], "variances": 1}}']), ["means", "NaN or infinite"]),
    ("world-m-norm-inf", ("flags", ["--model", 'exact:{{"kind": "two-class", "d": 4, "m_norm": Infinity, "s": 1}}']),
     ["m_norm", "NaN or infinite"]),
    ("world-means-str", ("flags", ["--model", 'exact:{{"means": [[0, "a"]], "variances": 1}}']), ["means holds 'a'"]),
    ("world-variance-neg", ("flags", ["--model", 'exact:{{"means": [[0, 0]], "variances": -1}}']), ["variances", ">= 0"]),
    ("world-lam-neg", ("flags", ["--model", 'exact:{{"kind": "gaussian", "lam": [1, -1]}}']), ["lam holds -1 < 0"]),
    ("world-dim-0", ("flags", ["--model", 'exact:{{"kind": "gaussian", "d": 0, "lam_max": 1, "lam_min": 0.1}}']),
     ["d=0", "integer >= 1"]),
    ("world-means-empty", ("flags", ["--model", 'exact:{{"means": [[]], "variances": 1}}']), ["means has shape (1, 0)"]),
    ("world-modes-0", ("flags", ["--model", 'exact:{{"kind": "modes", "d": 4, "n_modes": 0, "radius": 1, "s": 1}}']),
     ["n_modes=0"]),
    ("world-u-not-orthogonal", ("flags", ["--model", 'exact:{{"lam": [1, 2], "U": [[1, 1], [0, 1]]}}']),
     ["U is not orthogonal"]),
    ("world-json-malformed", ("flags", ["--model", 'exact:{{"means": ']), ["exact world JSON: malformed"]),
    ("world-file-not-utf8", ("flags", ["--model", "exact:{latin1_toml}"]), ["exact world file", "not UTF-8", "line 2"]),
    ("world-file-missing", ("flags", ["--model", "exact:{tmp}/nope.toml"]), ["exact world file", "no such file"]),
    # outputs
    ("out-is-file", ("flags", ["OUT:{afile}"]), ["afile: is a file, not a directory"]),
    ("out-under-file", ("flags", ["OUT:{afile}/s.zarr"]), ["is a file, not a directory"]),
    ("out-unwritable", ("flags", ["OUT:/proc/trajlab-test.zarr"]), ["not writable"]),
    ("out-foreign-folder", ("flags", ["OUT:{foreign}"]), ["holds no trajlab store", "notes.txt"]),
    # report
    ("report-n-boot-0", ("report", ["--n-boot", "0"]), ["--n-boot 0"]),
    ("demo-capture-processes-0", ("demo", ["--capture-processes", "0"]), ["--capture-processes 0", ">= 1"]),
    ("report-out-file", ("report", ["--out", "{afile}"]), ["afile: is a file, not a directory"]),
    ("report-out-unwritable", ("report", ["--out", "/proc/trajlab-report"]), ["not writable"]),
    ("report-no-complete", ("report", ["STORE:{empty_store}"]), ["no complete samples"]),
    ("info-unknown-group", ("info", ["{empty_store}/nope"]), ["no group named or labelled 'nope'", "empty.zarr"]),
    ("report-a-group", ("report", ["STORE:{empty_store}/g"]), ["is one group of a trajlab store"]),
]


@pytest.fixture
def files(tmp_path):
    from trajlab import store

    (tmp_path / "afile").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("a cat\nun caf\xe9\n".encode("latin-1"))
    (tmp_path / "latin1.toml").write_bytes(("model = 'tiny-sd'\nprompts = ['caf\xe9']\n").encode("latin-1"))
    (tmp_path / "good.toml").write_text(BASE_TOML)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    empty = tmp_path / "empty.zarr"
    store.allocate_group(empty, "g", store.GroupLayout(2, 3, (4, 4, 4), "float32", ("latent", "x0_pred", "model_output")),
                         timesteps=[3, 2, 1], alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1], prompt_index=[0, 0],
                         prompts=["a"], attrs={"config": {}})
    return {"tmp": str(tmp_path), "afile": str(tmp_path / "afile"), "latin1": str(tmp_path / "latin1.txt"),
            "latin1_toml": str(tmp_path / "latin1.toml"), "good_toml": str(tmp_path / "good.toml"),
            "foreign": str(tmp_path / "foreign"), "empty_store": str(empty)}


@pytest.fixture
def no_model_loads(monkeypatch):
    import trajlab.experiments.plans as plans_mod
    import trajlab.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(plans_mod, "plan_pipeline", refuse)
    monkeypatch.setattr(loading, "load_pipeline", refuse)


def _argv(case, files, tmp_path, monkeypatch):
    kind, body = case
    out = str(tmp_path / "s.zarr")
    if kind == "toml":
        cfg = tmp_path / "grid.toml"
        cfg.write_text(body)
        return ["capture", "--config", str(cfg), "--out", out, "--quiet"], out
    if kind == "info":
        return ["info", *[a.format(**files) for a in body]], None
    if kind == "demo":
        return ["demo", *body, "--out", str(tmp_path / "demo")], None
    if kind == "report":
        args = [a.format(**files) for a in body]
        target = files["empty_store"]
        if any(a.startswith("STORE:") for a in args):
            target = next(a[6:] for a in args if a.startswith("STORE:"))
            args = [a for a in args if not a.startswith("STORE:")]
        else:  # a store with one complete sample, so the option itself is what is refused
            from trajlab import store

            store.mark_complete(target, "g", 0, 1)
        if "--out" not in args:
            args += ["--out", str(tmp_path / "report")]
        return ["report", target, *args], None
    args = []
    for a in body:
        a = a.format(**files)
        if a.startswith("ENV:"):
            k, _, v = a[4:].partition("=")
            monkeypatch.setenv(k, v)
        elif a.startswith("OUT:"):
            out = a[4:]
        else:
            args.append(a)
    if "--config" in args:
        return ["capture", *args, "--out", out, "--quiet"], out
    base = list(FLAGS)
    for flag in ("--model", "--steps", "--height", "--seeds"):  # a case's own value replaces the base's
        if flag in args and flag in base:
            i = base.index(flag)
            del base[i: i + 2]
    return ["capture", *base, *args, "--out", out], out


@pytest.mark.parametrize("name,case,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_work(name, case, words, files, tmp_path, monkeypatch, capsys,
                                                     no_model_loads):
    if name == "flag-device-cuda" and _cuda():
        pytest.skip("this machine has CUDA")
    if name.endswith("unwritable") and P._can_create_in(__import__("pathlib").Path("/proc")):
        pytest.skip("/proc is writable here")
    argv, out = _argv(case, files, tmp_path, monkeypatch)
    existed = out is not None and os.path.exists(out)
    t0 = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    if os.environ.get("TRAJLAB_SHOW_REFUSALS"):
        print(f"\n{name}: {elapsed:.2f} s: {err}", file=sys.__stdout__)
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith("trajlab: error:") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert elapsed < 5.0, f"{elapsed:.1f} s to refuse"
    if out is not None and not existed and out.startswith(str(tmp_path)):
        assert not os.path.exists(out), "nothing may be written before input is validated"
    assert not (tmp_path / "escape").exists()


def test_a_sample_of_bad_inputs_through_python_m_trajlab(files, tmp_path):
    """The real command: exit 2, one line, no traceback, for a bad TOML value, NaN guidance, a huge seed, an
    unknown device and a non-UTF-8 prompt file."""
    import torch

    cfg = tmp_path / "grid.toml"
    cfg.write_text(_toml('guidance = "4"')[1])
    runs = [["capture", "--config", str(cfg)],
            ["capture", *FLAGS, "--guidance", "nan"],
            ["capture", *FLAGS[:-3], "--seeds", "18446744073709551616"],
            ["capture", *FLAGS, "--device", "banana"],
            ["capture", *FLAGS[:-5], "--seeds", "0:2", "--prompts", files["latin1"]]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for argv in runs:
        r = subprocess.run([sys.executable, "-m", "trajlab", *argv, "--out", str(tmp_path / "s.zarr")],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr[-2000:])
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("trajlab: error:"), r.stderr
        assert not (tmp_path / "s.zarr").exists()


# -- the plan parser itself (library callers) ------------------------------------------------------------
PLAN_CASES = [
    ({"prompts": "a cat"}, "expected a list of strings"),
    ({"seeds": [2**64]}, "out of range"),
    ({"seeds": [-1]}, "out of range"),
    ({"seeds": [True]}, "list of integers"),
    ({"steps": True}, "steps=True"),
    ({"steps": 2.0}, "steps=2.0"),
    ({"guidance": float("nan")}, "finite"),
    ({"guidance": float("inf")}, "finite"),
    ({"guidance": "4"}, "guidance='4'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": "2"}, "batch_size='2'"),
    ({"height": "32"}, "height='32'"),
    ({"images": "no"}, "images='no'"),
    ({"device": "banana"}, "device='banana'"),
    ({"negative_prompt": 3}, "negative_prompt=3"),
    ({"loras": "a"}, "loras='a'"),
]


@pytest.mark.parametrize("change,needle", PLAN_CASES, ids=[n for _, n in PLAN_CASES])
def test_capture_plan_validate_refuses_bad_fields(change, needle):
    kw = {"model": "tiny-sd", "prompts": ["a cat"], "seeds": [0], "steps": 3, "guidance": 4.0, **change}
    with pytest.raises(PlanError, match=None) as exc:
        CapturePlan(**kw).validate()
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_numpy_values_and_turbo_guidance_zero_are_fine():
    import numpy as np

    CapturePlan(model="tiny-sd", prompts=["a"], seeds=list(np.arange(3)), steps=np.int64(3),
                guidance=np.float32(0.0), batch_size=np.int64(2)).validate()


def test_parse_seeds_and_cells_directly():
    assert P.parse_seeds("0:3") == [0, 1, 2] and P.parse_seeds([1, "4:6"]) == [1, 4, 5]
    assert P.parse_seeds(2**63 - 1) == [2**63 - 1]
    for bad in (True, 1.5, None, {"a": 1}, "x", "3:1", [], 2**63):
        with pytest.raises(P.InputError):
            P.parse_seeds(bad)
    P.check_cell_types({"model": "m", "guidance": [0, 7.5], "steps": [2, 4], "images": False, "seeds": [0, "2:4"]})
    with pytest.raises(P.InputError, match=r"^grid.toml: steps=\[2, '4'\]: '4': expected an integer >= 1, got a string$"):
        P.check_cell_types({"steps": [2, "4"]}, "grid.toml")
