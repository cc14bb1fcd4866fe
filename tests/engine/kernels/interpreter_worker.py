"""Runs kernel test cases under the Triton CPU interpreter, in a process of its own.

Triton decides at `@triton.jit` decoration time (module import) whether a kernel is compiled or
interpreted, from TRITON_INTERPRET. Setting that variable inside the pytest process would switch
every kernel imported after it -- the GPU tests' too -- so the CPU tests start this module as a
subprocess with TRITON_INTERPRET=1 and send it calls instead:

    parent -> worker (stdin):   {"call": "tests.engine.kernels.moe_cases:run_fused_moe_case", "kwargs": {...}}
    worker -> parent (stdout):  @@result {"ok": true, "value": ...}   or   {"ok": false, "error": "<traceback>"}

`InterpreterWorker` is the parent's side. Only functions of `tests.engine.kernels` modules are called.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

RESULT_PREFIX = "@@result "
ALLOWED_PREFIX = "tests.engine.kernels."
REPO_ROOT = Path(__file__).resolve().parents[3]


class InterpreterWorker:
    """A long-lived `TRITON_INTERPRET=1` subprocess that runs named test functions."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["TRITON_INTERPRET"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        # a file, not a pipe, so a chatty worker cannot block; closed in close()
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.engine.kernels.interpreter_worker"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )

    def call(self, target: str, **kwargs: Any) -> Any:
        """Runs `module:function(**kwargs)` in the worker; raises AssertionError with its traceback."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({"call": target, "kwargs": kwargs}) + "\n")
        self._process.stdin.flush()
        for line in self._process.stdout:
            if line.startswith(RESULT_PREFIX):
                reply = json.loads(line[len(RESULT_PREFIX) :])
                if not reply["ok"]:
                    raise AssertionError(f"{target}({kwargs}) failed in the interpreter:\n{reply['error']}")
                return reply["value"]
        self._stderr.seek(0)
        raise RuntimeError(
            f"interpreter worker exited ({self._process.poll()}); stderr:\n{self._stderr.read()[-4000:]}"
        )

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def _serve() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("interpreter_worker must run with TRITON_INTERPRET=1")
    import torch

    torch.set_num_threads(1)  # the interpreter is single-threaded numpy; keep torch from oversubscribing
    for line in sys.stdin:
        request = json.loads(line)
        try:
            module_name, function_name = request["call"].split(":")
            if not module_name.startswith(ALLOWED_PREFIX):
                raise ValueError(f"only {ALLOWED_PREFIX}* functions may be called, got {module_name}")
            function = getattr(importlib.import_module(module_name), function_name)
            reply = {"ok": True, "value": function(**request["kwargs"])}
        except BaseException:
            reply = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.write(RESULT_PREFIX + json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
