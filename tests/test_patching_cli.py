"""`trajlab experiment patching`: refused arguments in one line before any model loads, and a small run end to end on
the shipped micro-world (one dataset, one figure, the latent of an Euler-ancestral receiver patched on its own grid)."""
import subprocess
import sys

import pytest
import xarray as xr

from trajlab.cli import main
from trajlab.experiments.demo_design import micro_available


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "trajlab", *args], capture_output=True, text=True, timeout=timeout)


def test_list_names_it_and_bad_arguments_fail_fast(tmp_path):
    out = run("experiment", "--list")
    assert out.returncode == 0 and "\npatching " in out.stdout
    for args, msg in ((["--seeds", "0:2"], "need >= 3"), (["--receiver", "no-such-model"], "unknown model"),
                      (["--map", "a=b"], "do not apply")):
        r = run("experiment", "patching", "--out", str(tmp_path / "x"), *args)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not micro_available(), reason="the micro-world weights (data/micro) are not there")
def test_patching_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "patching"
    rc = main(["experiment", "patching", "--out", str(out), "--quick", "--seeds", "0:3", "--receiver", "micro-turbo",
               "--site", "mid_block", "--site", "latent", "--quiet"])
    assert rc == 0
    assert "micro-sd_patching.nc" in capsys.readouterr().out
    ds = xr.open_dataset(out / "micro-sd_patching.nc")
    assert dict(ds.sizes) == {"receiver": 1, "site": 2, "step": 2}
    assert (out / "micro-sd_patching.png").stat().st_size > 5000
    turbo = ds.sel(receiver="micro-turbo")
    assert turbo["applicable"].sel(site="mid_block").values.all()
    assert turbo["applicable"].sel(site="latent").values.all() and str(turbo["latent_method"].values) == "own grid"
    assert float(turbo["div_restored"].sel(site="latent", step=0)) == 0.0  # step 0: the seed's noise, the receiver
    assert turbo["donor_step"].values.tolist() == [0, 14]  # nearest log sigma on the teacher's 30 DDIM steps
    assert float(turbo["collapse"]) < 0  # Turbo is less diverse than the teacher on these seeds too
