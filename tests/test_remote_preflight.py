"""Remote failures fast, one line each, before any model or analysis (issue 20 item 5): ``report --scheduler``
pointed at a live port that is not a dask scheduler (a plain TCP server that never answers, one that answers
garbage, one that closes, a refused port, a dask worker), and ``s3://`` stores whose endpoint refuses or does
not answer as S3, whose bucket is missing or whose credentials are absent (a moto S3 server)."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from trajlab import store
from trajlab.analysis import cluster
from trajlab.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_inputs import FLAGS, no_model_loads  # noqa: E402,F401 - a fixture
from test_sharding import s3_server  # noqa: E402,F401 - a fixture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tcp_server():
    """``tcp_server(mode)``: the port of a plain TCP server on 127.0.0.1 that is not dask's: ``silent`` accepts and
    never writes, ``garbage`` writes an SSH banner, ``close`` closes every connection at once."""
    sockets, stop = [], threading.Event()

    def start(mode):
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        srv.settimeout(0.2)
        sockets.append(srv)

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    continue
                sockets.append(conn)
                if mode == "garbage":
                    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
                elif mode == "close":
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    stop.set()
    for s in sockets:
        s.close()


@pytest.fixture
def complete_store(tmp_path):
    path = tmp_path / "s.zarr"
    layout = store.GroupLayout(2, 3, (2, 4, 4), "float32", ("latent", "x0_pred", "model_output"))
    store.allocate_group(path, "g", layout, timesteps=[3, 2, 1], alpha_bar=[0.1, 0.5, 0.9], seeds=[0, 1],
                         prompt_index=[0, 0], prompts=["a"], attrs={"config": {}})
    store.write_samples(path, "g", 0, {"final_latent": np.zeros((2, 2, 4, 4), np.float32)})
    store.mark_complete(path, "g", 0, 2)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trajlab: error:") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("mode,words", [
    ("silent", ["nothing answered as a dask scheduler within 2 s"]),
    ("garbage", ["not a dask scheduler"]),
    ("close", ["not a dask scheduler", "closed"]),
    ("refused", ["cannot connect", "refused"]),
])
def test_report_scheduler_that_is_not_dask_is_one_line_before_any_analysis(mode, words, tcp_server, complete_store,
                                                                          tmp_path, monkeypatch, capsys):
    import trajlab.experiments.reporting as reporting

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(reporting, "report_store", lambda *a, **k: pytest.fail("analysed with no scheduler"))
    port = _free_port() if mode == "refused" else tcp_server(mode)
    code = main(["report", str(complete_store), "--out", str(tmp_path / "r"), "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert code == 2
    line = _one_line(capsys)
    assert f"--scheduler tcp://127.0.0.1:{port}" in line
    for w in words:
        assert w in line, line


def test_probe_scheduler_knows_a_scheduler_from_a_worker():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                  dashboard_address=":0") as lc:
        assert cluster.probe_scheduler(lc.scheduler_address, 10)["type"] == "Scheduler"
        worker = next(iter(lc.scheduler.workers))
        with pytest.raises(cluster.ClusterError, match="answered as a dask Worker, not a scheduler"):
            cluster.probe_scheduler(worker, 10)


def test_the_real_command_on_a_silent_port_ends_in_one_line(tcp_server, complete_store, tmp_path):
    port = tcp_server("silent")
    r = subprocess.run([sys.executable, "-m", "trajlab", "report", str(complete_store), "--out", str(tmp_path / "r"),
                        "--scheduler", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "nothing answered as a dask scheduler" in r.stderr
    assert not (tmp_path / "r").exists()


# -- s3:// ------------------------------------------------------------------------------------------------------
def _s3_commands(url, tmp_path):
    return {"capture": ["capture", *FLAGS, "--out", url],
            "report": ["report", url, "--out", str(tmp_path / "r")],
            "info": ["info", url]}


@pytest.fixture
def s3_env(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "TRAJLAB_REMOTE_TIMEOUT_S": "2", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    pytest.importorskip("s3fs")


@pytest.mark.parametrize("endpoint,words", [
    ("refused", ["cannot reach the object store at http://127.0.0.1:"]),
    ("unroutable", ["http://10.255.255.1:9000"]),  # no route, or (in a sandbox) an HTTP server that is not S3
])
@pytest.mark.parametrize("command", ["capture", "report", "info"])
def test_s3_endpoint_that_refuses_or_is_unreachable_is_one_line(endpoint, words, command, s3_env, tmp_path,
                                                              monkeypatch, capsys, no_model_loads):
    url = f"http://127.0.0.1:{_free_port()}" if endpoint == "refused" else "http://10.255.255.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    assert main(_s3_commands("s3://trajlab/study.zarr", tmp_path)[command]) == 2
    line = _one_line(capsys)
    assert "s3://trajlab/study.zarr" in line and ("cannot reach" in line or "did not answer" in line), line
    for w in words:
        assert w in line, line


def test_s3_missing_bucket_and_missing_credentials_are_one_line(s3_server, s3_env, tmp_path, monkeypatch, capsys,
                                                                no_model_loads):
    for command in ("capture", "report", "info"):  # (one moto server a test: its buckets outlive it)
        assert main(_s3_commands("s3://nobucket/study.zarr", tmp_path)[command]) == 2
        assert "bucket 'nobucket' does not exist at http://127.0.0.1:" in _one_line(capsys)
    store.check_remote("s3://trajlab/study.zarr")  # the bucket that is there passes
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for command in ("capture", "report", "info"):
        assert main(_s3_commands("s3://trajlab/study.zarr", tmp_path)[command]) == 2
        assert "no credentials found" in _one_line(capsys)
