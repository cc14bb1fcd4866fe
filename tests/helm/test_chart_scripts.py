"""The chart's scripts, run for real: the worker entrypoint (ordinal → initial role), the model
copier, the nccl-tests gate and the smoke test."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from tests.helm.conftest import CHART, RELEASE

FILES = CHART / "files"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, FILES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_bin(tmp_path):
    """A bin/ folder first on PATH; put(name, script) adds an executable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def put(name: str, script: str) -> None:
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    put.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return put


# ----------------------------------------------------------------------------- worker entrypoint
@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        (None, ["prefill", "decode", "mixed"]),
        ("gpu-4x2", ["prefill", "prefill", "decode", "decode", "mixed"]),
        ("production", ["prefill", "prefill", "decode", "decode", "decode", "mixed", "mixed"]),
    ],
)
def test_the_statefulset_ordinal_picks_the_initial_role(render, fake_bin, variant, expected):
    """Ordinals 0.. take prefill, then decode, then mixed; one past the declared workers starts mixed."""
    worker = render(variant).get("StatefulSet", "worker")["spec"]["template"]["spec"]["containers"][0]
    shell, flag, script, argv0 = worker["command"]
    fake_bin("pdserve", 'echo "$@"\n')
    for ordinal, role in enumerate(expected):
        env = {**fake_bin.env, "POD_NAME": f"{RELEASE}-pdserve-worker-{ordinal}"}
        out = subprocess.run(
            [shell, flag, script, argv0, "--port=1", "--x=a b"], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == f"worker --role {role} --port=1 --x=a b", (ordinal, out.stdout)


# ----------------------------------------------------------------------------- fetch_model.py
def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


MODEL = {
    "ERNIE/config.json": b"{}",
    "ERNIE/tokenizer.model": b"spm",
    "ERNIE/model-00001-of-00002.safetensors": b"w" * 1000,
    "ERNIE/sub/chat_template.jinja": b"{{ x }}",
}


def test_fetch_model_streams_an_archive_over_http_and_keeps_only_matching_files(tmp_path, capsys):
    fetch = _load("fetch_model")
    served = tmp_path / "served"
    served.mkdir()
    _archive(served / "model.tar.gz", MODEL)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/model.tar.gz"
    dest = tmp_path / "models" / "ernie"
    argv = ["--source", url, "--dest", str(dest), "--strip-components", "1", "--include", "*.json"]
    try:
        assert fetch.main([*argv, "--include", "*.jinja", "--include", "*.model"]) == 0
    finally:
        server.shutdown()
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [".pdserve-fetched", "config.json", "sub/chat_template.jinja", "tokenizer.model"]
    # The server is gone: a second run with the same source finds the marker and does nothing.
    assert fetch.main([*argv, "--include", "*.model", "--include", "*.jinja"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_fetch_model_copies_everything_without_patterns_and_refuses_escaping_members(tmp_path):
    fetch = _load("fetch_model")
    url = _archive(tmp_path / "m.tar.gz", MODEL).as_uri()
    dest = tmp_path / "all"
    assert fetch.main(["--source", url, "--dest", str(dest)]) == 0
    assert (dest / "ERNIE" / "model-00001-of-00002.safetensors").read_bytes() == b"w" * 1000
    evil = _archive(tmp_path / "evil.tar.gz", {"../../escape.txt": b"x"}).as_uri()
    with pytest.raises(ValueError, match="outside"):
        fetch.main(["--source", evil, "--dest", str(tmp_path / "evil")])
    assert not (tmp_path.parent / "escape.txt").exists()
    assert fetch.main(["--source", url, "--dest", str(tmp_path / "none"), "--include", "*.bin"]) == 1
    assert fetch.main(["--source", "s3://bucket/model", "--dest", str(tmp_path / "s3")]) == 2


# ----------------------------------------------------------------------------- nccl_tests.sh
NCCL_TESTS_OUTPUT = """\
# nThread 1 nGpus 2 minBytes 1048576 maxBytes 1073741824 step: 4(factor) warmup iters: 5 iters: 20
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     1048576        262144     float     sum      -1    21.50   48.77   48.77      0    21.10   49.70   49.70      0
  1073741824  268435456  float  sum  -1  3301.0  325.29  {busbw}  {wrong}  3299.0  325.47  325.47  0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 187.0
"""


def _nccl_tests(fake_bin, args: list[str], busbw: str = "325.29", wrong: str = "0", fail: bool = False):
    for op in ("sendrecv", "all_reduce"):
        body = NCCL_TESTS_OUTPUT.format(busbw=busbw, wrong=wrong)
        fake_bin(f"{op}_perf", f"cat <<'EOF'\n{body}EOF\necho \"args: $*\"\n" + ("exit 3\n" if fail else ""))
    return subprocess.run(["sh", str(FILES / "nccl_tests.sh"), *args], capture_output=True, text=True, env=fake_bin.env)


def test_nccl_tests_gate_passes_at_the_threshold_and_forwards_arguments(fake_bin):
    out = _nccl_tests(fake_bin, ["2", "300", "325", "-b", "1M", "-e", "1G"])
    assert out.returncode == 0, out.stdout
    assert "PASS: sendrecv busbw 325.29 GB/s at 1073741824 B (threshold 300 GB/s)" in out.stdout
    assert "PASS: all_reduce busbw 325.29 GB/s at 1073741824 B (threshold 325 GB/s)" in out.stdout
    assert "args: -g 2 -b 1M -e 1G" in out.stdout


def test_nccl_tests_gate_fails_under_the_threshold_on_wrong_results_and_on_errors(fake_bin):
    slow = _nccl_tests(fake_bin, ["2", "0", "400"])
    assert slow.returncode == 1
    assert "FAIL: all_reduce busbw 325.29 GB/s at 1073741824 B is under 400 GB/s" in slow.stdout
    assert "PASS: sendrecv" in slow.stdout
    wrong = _nccl_tests(fake_bin, ["2", "0", "0"], wrong="17")
    assert wrong.returncode == 1 and "17 wrong elements" in wrong.stdout
    crashed = _nccl_tests(fake_bin, ["2", "0", "0"], fail=True)
    assert crashed.returncode == 1 and "sendrecv_perf exited with an error" in crashed.stdout


# ----------------------------------------------------------------------------- smoke_test.py
class _FakeRouter(http.server.BaseHTTPRequestHandler):
    key = "sk-test-0123456789"
    healthy_after = 2  # /health says 503 this many times first

    def log_message(self, *args):  # keep pytest's output clean
        return

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            type(self).healthy_after -= 1
            return self._send(200 if self.healthy_after < 0 else 503, {})
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": {"message": "missing key"}})
        return self._send(200, {"data": [{"id": "tiny"}]})

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        request = json.loads(self.rfile.read(length))
        if self.headers.get("Authorization") != f"Bearer {self.key}":
            return self._send(401, {"error": {"message": "missing key"}})
        assert request["model"] == "tiny" and request["max_tokens"] == 4
        return self._send(200, {"choices": [{"text": "abcd"}], "usage": {"completion_tokens": 4}})


def test_smoke_test_waits_for_health_then_completes_with_the_api_key(tmp_path, monkeypatch, capsys):
    smoke = _load("smoke_test")
    monkeypatch.setattr(smoke.time, "sleep", lambda s: None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeRouter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    keys = tmp_path / "keys"
    keys.write_text(f"\n{_FakeRouter.key}\nsecond-key\n")
    try:
        assert smoke.main(["--url", url, "--api-key-file", str(keys), "--wait", "30"]) == 0
        assert "tiny answered 'abcd'" in capsys.readouterr().out
        assert smoke.main(["--url", url]) == 1  # no key: 401
        assert "GET /v1/models -> 401" in capsys.readouterr().err
    finally:
        server.shutdown()
