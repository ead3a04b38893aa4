"""The CLI end to end: capture (flags and TOML grids), info, models, resume after a kill, bad input."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trajlab import store
from trajlab.cli import main

TINY = ["--model", "tiny-sd", "--steps", "3", "--height", "32", "--width", "32", "--quiet"]


def _env():
    """Subprocesses use this process's thread count: bitwise comparisons need the same reduction order."""
    import torch

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _run(*args, timeout=300):
    env = _env()
    return subprocess.run([sys.executable, "-m", "trajlab", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_capture_info_models_end_to_end(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(["capture", *TINY, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:3", "--out", str(out),
                 "--guidance", "4", "--negative-prompt", "blurry"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("captured 6 samples (0 already complete) in 1 group(s)") and "MB" in line
    (g,) = store.group_names(out)
    ds = store.open_group(out, g)
    assert ds.sizes["sample"] == 6 and ds.attrs["negative_prompt"] == "blurry" and ds.attrs["guidance"] == 4.0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert g in info and "samples=6" in info and "complete" in info
    # a second identical run skips everything
    assert main(["capture", *TINY, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:3", "--out", str(out),
                 "--guidance", "4", "--negative-prompt", "blurry"]) == 0
    assert "captured 0 samples (6 already complete)" in capsys.readouterr().out
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in ("sd15", "sdxl", "lcm-lora-sd15", "lcm-lora-sdxl", "lcm-dreamshaper-v7", "lcm-sdxl", "pcm-sd15-4step",
                 "pcm-sdxl-2step", "tlcm-sdxl", "sdxl-turbo", "tiny-sd", "tiny-sdxl", "micro-sd", "micro-lcm"):
        assert f"\n{name} " in listing, name


def test_toml_grid_one_group_per_cell(tmp_path, capsys):
    cfg = tmp_path / "grid.toml"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# comment\n\na dog\n")
    cfg.write_text(f"""
height = 32
width = 32
seeds = "0:2"
prompts_file = "{prompts}"
batch_size = 4
[[run]]
model = "tiny-sd"
scheduler = ["ddim", "euler"]
steps = [2, 3]
guidance = 3.0
[[run]]
model = "tiny-lcm"
steps = 2
""")
    out = tmp_path / "g.zarr"
    assert main(["capture", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    groups = store.group_names(out)
    assert len(groups) == 5
    dt = store.open(out)
    for g in groups:
        ds = dt[g].to_dataset()
        assert ds.sizes["sample"] == 4 and bool(ds.complete.all())
        assert list(ds.prompt_text.values) == ["a cat", "a dog"]
    steps = sorted(int(dt[g].to_dataset().sizes["step"]) for g in groups)
    assert steps == [2, 2, 2, 3, 3]


BAD = [
    (["--model", "no-such-model", "--prompt", "x"], "no-such-model"),
    (["--model", "tiny-sd", "--scheduler", "warp", "--prompt", "x"], "unknown scheduler 'warp'"),
    (["--model", "tiny-sd", "--steps", "0", "--prompt", "x"], "steps=0"),
    (["--model", "tiny-sd", "--guidance", "-1", "--prompt", "x"], "guidance=-1"),
    (["--model", "tiny-sd"], "prompts is empty"),
    (["--model", "tiny-sd", "--prompt", "x", "--seeds", "a:b"], "--seeds"),
    (["--model", "sd15", "--prompt", "x"], "hf download stable-diffusion-v1-5/stable-diffusion-v1-5"),
    (["--model", "tiny-sd", "--prompt", "x", "--lora", "nobody/missing-lora:0.5"], "LoRA 'nobody/missing-lora'"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[b[1][:20] for b in BAD])
def test_bad_input_is_one_clear_line(args, needle, tmp_path, capsys):
    out = tmp_path / "s.zarr"
    code = main(["capture", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("trajlab: error:") and needle in err, err
    assert not out.exists(), "nothing may be written before input is validated"


def test_unwritable_output_and_malformed_toml_and_conflicts(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not bind, use a path under a file
            target = tmp_path / "afile"
            target.write_text("x")
            out = target / "s.zarr"
        else:
            out = ro / "s.zarr"
        assert main(["capture", *TINY, "--prompt", "x", "--out", str(out)]) == 2
        assert "--out" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
    bad = tmp_path / "bad.toml"
    bad.write_text("model = [unclosed\n")
    assert main(["capture", "--config", str(bad), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "malformed TOML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('model = "tiny-sd"\nstepz = 3\n')
    assert main(["capture", "--config", str(unknown), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "unknown keys ['stepz']" in capsys.readouterr().err
    # a config that conflicts with the store's group
    out = tmp_path / "c.zarr"
    assert main(["capture", *TINY, "--prompt", "x", "--group", "fixed", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["capture", *TINY, "--prompt", "y", "--group", "fixed", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prompts: store has ['x'], asked ['y']" in err and len(err.strip().splitlines()) == 1


def test_no_traceback_from_subprocess_on_bad_input(tmp_path):
    r = _run("capture", "--model", "tiny-sd", "--steps", "-3", "--prompt", "x", "--out", str(tmp_path / "s.zarr"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "steps=-3" in r.stderr


RESUME_ARGS = ["capture", *TINY, "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0:10", "--batch-size", "2",
               "--group", "g", "--no-images"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The store of RESUME_ARGS run to the end in one go: the reference both interrupted runs must equal."""
    full = tmp_path_factory.mktemp("resume") / "full.zarr"
    assert main([*RESUME_ARGS, "--out", str(full)]) == 0
    return full


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_resume_after_kill_equals_uninterrupted_run(sig, uninterrupted, tmp_path, capsys):
    args, full = RESUME_ARGS, uninterrupted
    part = tmp_path / "part.zarr"
    env = _env()
    # SIGINT at its default (a parent started in the background may have it ignored, which the child inherits)
    proc = subprocess.Popen([sys.executable, "-m", "trajlab", *args, "--out", str(part)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    n_done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n_done = int(store.completed(part, "g").sum())
        except Exception:
            n_done = 0
        if n_done >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:  # Ctrl-C: one line saying how to resume, no traceback
        assert proc.returncode == 130 and "re-run the same command to resume" in err and "Traceback" not in err, err
    done = store.completed(part, "g")
    assert 2 <= done.sum() < 20, f"the kill should land mid-run; {done.sum()} samples were complete"
    capsys.readouterr()
    assert main([*args, "--out", str(part)]) == 0
    n_redo = 20 - int(done.sum())
    assert f"captured {n_redo} samples ({int(done.sum())} already complete)" in capsys.readouterr().out
    a = store.open_group(full, "g").load()
    b = store.open_group(part, "g").load()
    assert bool(b.complete.all())
    for var in ("latent", "x0_pred", "model_output", "model_output_cond", "final_latent"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)


def test_prompts_from_a_suite_toml(tmp_path):
    from trajlab.experiments.plans import InputError as CliError, read_prompts

    suite = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "prompts" / "seed_table.toml"
    assert read_prompts(suite)[0] == "a photograph of a dog"
    bad = tmp_path / "bad.toml"
    bad.write_text("[[prompt]]\ncategory = 'x'\n")
    with pytest.raises(CliError, match="needs a text"):
        read_prompts(bad)


def test_cli_refuses_bad_flags_before_heavy_imports(tmp_path):
    """A bad argument costs well under a second: no torch/diffusers import before validation."""
    code = ("import sys, time; t = time.process_time(); from trajlab.cli import main; "
            "rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules, "
            "round(time.process_time() - t, 3))")
    for args in (["capture", "--model", "tiny-sd", "--steps", "0", "--prompt", "x", "--out", str(tmp_path / "s")],
                 ["capture", "--model", "micro-sdd", "--prompt", "x", "--out", str(tmp_path / "s")],
                 ["capture", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "s")],
                 # stock diffusers would crash at the first step (LCM pipeline passes eta=None to TCD)
                 ["capture", "--model", "micro-lcm", "--scheduler", "tcd", "--prompt", "x", "--out", str(tmp_path / "s")]):
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(), timeout=60)
        rc, torch_loaded, diffusers_loaded, cpu_s = r.stdout.split()
        assert rc == "2" and torch_loaded == "False" and diffusers_loaded == "False", (args, r.stdout, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_usage_errors_name_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["capture", "--model", "tiny-sd", "--seed", "3"])  # --seed is not silently taken as --seeds
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: trajlab capture" in err and "--seed" in err
    with pytest.raises(SystemExit):
        main(["capture", "--stepz", "3"])
    assert "usage: trajlab capture" in capsys.readouterr().err
    assert main(["capture", "--model", "micro-sdd", "--prompt", "x", "--out", "/tmp/never"]) == 2
    assert "did you mean micro-sd" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("trajlab ")
    with pytest.raises(SystemExit):
        main(["capture", "--help"])
    helptext = capsys.readouterr().out
    assert "examples:" in helptext and "dpm++" in helptext and "--steps" in helptext and "TOML" in helptext


def test_rerun_with_its_own_derived_group_name_resumes(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert main(["capture", *TINY, "--prompt", "x", "--seeds", "0:2", "--out", str(out)]) == 0
    (g,) = store.group_names(out)
    capsys.readouterr()
    assert main(["capture", *TINY, "--prompt", "x", "--seeds", "0:2", "--out", str(out), "--group", g]) == 0
    assert "captured 0 samples (2 already complete)" in capsys.readouterr().out


def test_custom_exact_world_from_a_toml_file(tmp_path, capsys):
    """--model exact:world.toml captures a user's own GMM; its samples land on the world's modes with its weights."""
    world = tmp_path / "world.toml"
    world.write_text('kind = "gmm"\nmeans = [[3.0, 0.0, 0.0], [-3.0, 0.0, 0.0]]\nvariances = [0.05, 0.05]\n'
                     'weights = [0.75, 0.25]\n')
    out = tmp_path / "w.zarr"
    assert main(["capture", "--model", f"exact:{world}", "--steps", "50", "--prompt", "x", "--seeds", "0:400",
                 "--batch-size", "400", "--out", str(out), "--quiet"]) == 0
    (g,) = store.group_names(out)
    x = store.open_group(out, g)["final_latent"].values.reshape(400, 3)
    right = x[:, 0] > 0
    assert abs(right.mean() - 0.75) < 0.07  # binomial SD 0.022
    np.testing.assert_allclose(np.abs(x[:, 0]).mean(), 3.0, atol=0.1)
    assert np.abs(x[:, 1:]).max() < 1.5
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "gmm"\nmeans = [[1.0, 0.0], [0.0, 1.0]]\nweights = [1.0]\nvariances = 0.1\n')
    capsys.readouterr()
    assert main(["capture", "--model", f"exact:{bad}", "--prompt", "x", "--out", str(tmp_path / "b.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights has shape (1,); expected (2,)" in err


def test_eta_line_extrapolates_the_rate_per_unit_of_cost():
    from trajlab.progress import eta_line

    assert eta_line(0, 40, 0.0, 0, 3) == "[0/3]"
    # 30 cost units in 60 s -> 2 s a unit; 10 units left -> ~20 s
    assert eta_line(30, 40, 60.0, 1, 3) == "[1/3], ~20 s left"
    assert eta_line(40, 40, 75.0, 3, 3) == "[3/3]"


def test_models_lists_every_seed_system_with_its_offline_analogue(capsys):
    from trajlab.models.registry import REAL_MODELS, SEED_SYSTEMS, registry

    reg = registry()
    for m in REAL_MODELS:  # every real system of the plan has a micro-world analogue that the registry knows
        assert m.name in SEED_SYSTEMS, m.name
        assert SEED_SYSTEMS[m.name] in reg and SEED_SYSTEMS[m.name].startswith("micro-"), m.name
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "offline analogue" in out.splitlines()[0]
    for line in out.splitlines()[1:]:
        name = line.split()[0]
        if name in SEED_SYSTEMS:
            assert f" {SEED_SYSTEMS[name]} " in line
