"""Every command the README shows is exercised: run as written, or (where it needs hardware, weights or a
cluster this machine cannot have) run to its clear, fast error, or mapped to the test that exercises it.

The README's fenced code blocks are parsed into commands (backslash continuations joined, ``;`` split,
comments dropped). A command that no rule below covers fails ``test_every_readme_command_is_covered``,
so a new README command cannot go untested silently.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_WORD_LIMIT = 1500

RUN = "run"                # executed as written (in order, in a scratch dir with the repo's data/examples/analyses)
FAILS_FAST = "fails-fast"  # executed as written; must exit 2 within seconds with the given message
# (kind, regex on the command, detail): detail is the message for FAILS_FAST, "tests/file.py::test" for tests
RULES = [
    ("make", r"^make demo$", "tests/test_report.py::test_demo_writes_store_and_report"),
    ("make", r"^make test$", "the suite itself (.ci/run calls make test)"),
    (RUN, r"-m trajlab capture --model micro-sd .* --out runs/quick\.zarr$", None),
    (RUN, r"-m trajlab info runs/quick\.zarr$", None),
    (RUN, r"-m trajlab models$", None),
    (RUN, r"-m trajlab capture --model exact:examples/world\.toml .* --out runs/w\.zarr$", None),
    (RUN, r"-m trajlab --version$", None),
    (RUN, r"-m trajlab capture --help$", None),
    (RUN, r"analyses/commitment\.py runs/quick\.zarr --labeller micro --out runs/commitment$", None),
    (RUN, r"analyses/jacobian_contraction\.py runs/w\.zarr --out runs/jac$", None),
    (RUN, r"-m trajlab experiment --list$", None),
    (RUN, r"-m trajlab experiment hybrid --offline --quick --out runs/hybrid\.zarr$", None),
    (RUN, r"-m trajlab report runs/hybrid\.zarr --out runs/hybrid-report$", None),
    ("test", r"-m trajlab calibrate --out runs/calibration --quick$",
     "tests/test_calibration.py::test_calibrate_command_end_to_end"),
    ("test", r"-m trajlab demo --out runs/demo$", "tests/test_report.py::test_demo_writes_store_and_report"),
    (FAILS_FAST, r"^python -m trajlab capture --model (sd15|lcm-lora-sd15) ", "hf download stable-diffusion-v1-5"),
    (FAILS_FAST, r"^python -m trajlab experiment seed_table ", "hf download stable-diffusion-v1-5"),
    (FAILS_FAST, r"^python -m trajlab report runs/table\.zarr ", "no store at runs/table.zarr"),
    ("test", r"^torchrun --nproc-per-node \d+ -m trajlab (capture|experiment) ",
     "tests/test_sharding.py::test_torchrun_two_ranks_equal_one_process"),
    ("test", r"^trajlab capture --config grid\.toml --out s3://\S+ --shard \d/\d$",
     "tests/test_sharding.py::test_two_concurrent_shards_into_s3_equal_local_one_process"),
    ("test", r"^trajlab report runs/study\.zarr --out runs/report --workers \d+$",
     "tests/test_streaming.py::test_report_with_workers_equals_default_scheduler"),
    ("test", r"^dask (scheduler|worker) ", "tests/test_streaming.py::test_report_cli_checks_cluster_options_first"),
    ("test", r"^trajlab report s3://\S+ --out runs/report --scheduler tcp://\S+$",
     "tests/test_streaming.py::test_open_by_url_streams_like_a_local_store"),
    ("test", r"trajlab taps micro-sd --depth 4$", "tests/test_module_taps.py::test_taps_command_lists_names_and_marks_cross_attention"),
    ("test", r"trajlab capture --model micro-sd .* --tap mid_block .*--attention-maps --out runs/look\.zarr$",
     "tests/test_module_taps.py::test_cli_and_toml_taps_info_bytes_and_a_group_captured_without_them"),
    ("test", r"-m trajlab experiment patching --out runs/patching$",
     "tests/test_patching_cli.py::test_patching_command_end_to_end"),
    ("test", r"trajlab info runs/look\.zarr$",
     "tests/test_module_taps.py::test_cli_and_toml_taps_info_bytes_and_a_group_captured_without_them"),
]


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, body)] of the fenced code blocks."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(body: str) -> list[str]:
    """Commands of a shell block: continuations joined, comments dropped, ``;`` split, blank lines skipped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip() if not line.lstrip().startswith("#") else ""
        out.extend(c.strip() for c in line.split(";") if c.strip())
    return out


def readme_commands() -> tuple[list[str], list[str]]:
    """(shell commands, python blocks) of the README, then of docs/*.md (in file order)."""
    shells, pythons = [], []
    for f in [README, *DOCS]:  # in docs/, only blocks marked bash/sh are commands (others are layouts, TOML, ...)
        for lang, body in readme_blocks(f.read_text()):
            if lang == "python" and f == README:
                pythons.append(body)
            elif lang in ("bash", "sh") or (lang == "" and f == README):
                shells.extend(shell_commands(body))
    return shells, pythons


def test_readme_is_short():
    """The README is read in five minutes: at most README_WORD_LIMIT words (code blocks included)."""
    words = len(README.read_text().split())
    assert words <= README_WORD_LIMIT, f"README.md has {words} words; move detail to docs/"


def rule_for(cmd: str):
    hits = [r for r in RULES if re.search(r[1], cmd)]
    assert len(hits) == 1, f"README command {cmd!r} matches {len(hits)} rules (expected exactly 1): {hits}"
    return hits[0]


def test_every_readme_command_is_covered():
    shells, pythons = readme_commands()
    assert len(shells) >= 20 and pythons, "README parsing found too few commands: the parser or README changed"
    for cmd in shells:
        kind, _, detail = rule_for(cmd)
        if kind in ("test", "make") and detail.startswith("tests/"):
            path, name = detail.split("::")
            assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{cmd!r}: mapped test {detail} is gone"
    used = {r[1] for r in RULES for c in shells if re.search(r[1], c)}
    assert used == {r[1] for r in RULES}, f"rules that match no README command (stale): {sorted({r[1] for r in RULES} - used)}"


def _argv(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv[0] in (".venv/bin/python", "python"):
        argv[0] = sys.executable
    return argv


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    for name in ("data", "examples", "analyses"):
        (d / name).symlink_to(ROOT / name)
    return d


def _run(argv, cwd, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


RUNS_PATH = re.compile(r"\bruns/[\w.-]+")
"""A path under runs/ that a README command or snippet writes or reads."""


def readme_chains(shells: list[str], pythons: list[str]) -> list[list[tuple[str, list[str]]]]:
    """The RUN commands (and the python snippets, right after the micro-sd capture whose store they read) as
    chains of (what, argv) in README order: two steps share a chain when they name a common runs/ path, so every
    step runs after the earlier steps that write what it reads; steps of different chains share no path."""
    steps = []
    for cmd in shells:
        if rule_for(cmd)[0] != RUN:
            continue
        steps.append((cmd, _argv(cmd), set(RUNS_PATH.findall(cmd))))
        if "capture --model micro-sd" in cmd:  # the python snippets read this store
            steps += [(f"python block:\n{b}", [sys.executable, "-c", b], set(RUNS_PATH.findall(b)) | steps[-1][2])
                      for b in pythons]
    root = list(range(len(steps)))

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    owner: dict = {}
    for i, (_, _, paths) in enumerate(steps):
        for p in sorted(paths):
            root[find(i)] = find(owner.setdefault(p, i))
    chains: dict = {}
    for i, (what, argv, _) in enumerate(steps):
        chains.setdefault(find(i), []).append((what, argv))
    return list(chains.values())


def test_readme_chains_keep_every_reader_after_its_writer():
    shells, pythons = readme_commands()
    chains = readme_chains(shells, pythons)
    flat = [w for c in chains for w, _ in c]
    assert len(flat) == sum(r[0] == RUN for r in RULES) + len(pythons)
    chain_of = {w: i for i, c in enumerate(chains) for w, _ in c}
    for a, b in (("capture --model micro-sd", "python block"), ("capture --model micro-sd", "info runs/quick.zarr"),
                 ("capture --model micro-sd", "analyses/commitment.py"), ("--out runs/w.zarr", "jacobian_contraction"),
                 ("experiment hybrid", "report runs/hybrid.zarr")):
        (wa,), (wb,) = [w for w in flat if a in w][:1], [w for w in flat if b in w][:1]
        assert chain_of[wa] == chain_of[wb] and flat.index(wa) < flat.index(wb), (a, b)
    assert len(chains) >= 3


def test_readme_commands_run_as_written(scratch):
    """The quick start, the analysis scripts, the python snippet and the offline study commands, in README
    order within each chain of commands that share a runs/ path (readme_chains), in one scratch directory (later
    commands read the stores earlier ones wrote); independent chains run concurrently, three at a time (each
    command mostly uses one core; on the 2-core CI machine the three longest chains, ~35 s each, then share both
    cores: ~70 s instead of ~105 s in a row, measured)."""
    from concurrent.futures import ThreadPoolExecutor

    shells, pythons = readme_commands()

    def run_chain(chain):
        done = []
        for what, argv in chain:
            r = _run(argv, scratch, timeout=600)
            if r.returncode != 0:
                return done, f"README command failed ({r.returncode}): {what}\n{r.stderr[-3000:]}"
            done.append(what)
        return done, None

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run_chain, sorted(readme_chains(shells, pythons), key=len, reverse=True)))
    failed = [err for _, err in results if err]
    assert not failed, failed[0]
    ran = [w for done, _ in results for w in done if not w.startswith("python block")]
    assert len(ran) == sum(r[0] == RUN for r in RULES)
    assert (scratch / "runs/hybrid-report/index.html").is_file()
    assert list((scratch / "runs/jac").glob("*.nc")) and list((scratch / "runs/commitment").glob("*.nc"))
    info = _run(_argv(".venv/bin/python -m trajlab info runs/quick.zarr"), scratch, 120).stdout
    assert "16" in info and "micro-sd" in info


def test_readme_commands_for_absent_checkpoints_fail_fast_and_say_what_to_download(scratch):
    shells, _ = readme_commands()
    checked = 0
    for cmd in shells:
        kind, _, message = rule_for(cmd)
        if kind != FAILS_FAST:
            continue
        r = _run(_argv(cmd), scratch, timeout=120)  # a missing checkpoint is found before any model work
        assert r.returncode == 2 and message in r.stderr, f"{cmd}: rc {r.returncode}, stderr {r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr
        checked += 1
    assert checked == 4
