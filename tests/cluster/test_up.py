"""`pdserve up` itself (what `make serve` runs): one command starts the router and workers, prints
where each listens, serves through the printed address, and Ctrl-C stops every process it started."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine import LLM, SamplingParams
from router.client import Client

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0  # `up` gives each process a 5 s grace period, then kills it
ROUTER_LINE = re.compile(r"^router\s+gRPC (\S+)\s")
WORKER_LINE = re.compile(r"^((?:prefill|decode|mixed)-\d+)\s+gRPC (\S+)\s.*\spid (\d+)$")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a pid from a later reuse); None once gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return None if fields[0] == "Z" else int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live process below `root` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        started = start_time(pid)
        if started is not None:
            found[pid] = started
        todo.extend(parents.get(pid, []))
    return found


def survivors(processes: dict[int, int]) -> list[int]:
    return [pid for pid, started in processes.items() if start_time(pid) == started]


class Output:
    """The lines `up` prints, read on a thread so the test can wait for one with a deadline."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(popen,), daemon=True).start()

    def _pump(self, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                seen = "\n".join(self.lines)
                raise AssertionError(f"no line matching {pattern!r} in {timeout:.0f} s:\n{seen}") from None
            if line is None:
                raise AssertionError(f"`up` exited before printing {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if re.search(pattern, line):
                return line


def test_up_serves_on_the_printed_address_and_ctrl_c_stops_every_process():
    offline = LLM(model="tiny").generate("Hello there", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    up = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--port", "0"],  # port 0: the router (and its HTTP) pick free ones
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    children: dict[int, int] = {}
    try:
        output = Output(up)
        output.wait_for(r"^try:\s+pdserve generate --url ", START_TIMEOUT_S)
        output.wait_for(r"^output: ", 60)  # the greeting request `make serve` sends on start
        children = descendants(up.pid)

        routers = [m.group(1) for line in output.lines if (m := ROUTER_LINE.match(line))]
        workers = {m.group(1): (m.group(2), int(m.group(3))) for line in output.lines if (m := WORKER_LINE.match(line))}
        assert len(routers) == 1, output.lines
        assert any(re.match(r"^router\s+HTTP http://127\.0\.0\.1:\d+/v1", line) for line in output.lines)
        assert any(re.match(r"^router\s+metrics http://127\.0\.0\.1:\d+/metrics", line) for line in output.lines)
        assert sorted(workers) == ["decode-1", "prefill-0"], output.lines  # the embedded defaults: 1P + 1D
        assert {pid for _, pid in workers.values()} < set(children)
        assert len(children) == 3, children  # the router and two workers, nothing else

        with Client(routers[0], timeout=60) as client:
            result = client.generate("Hello there", max_tokens=8, temperature=0, ignore_eos=True)
        assert result.token_ids == list(offline[0].token_ids)
        assert result.finish_reason == "length"

        assert sorted(survivors(children)) == sorted(children)  # the check below sees live processes
        up.send_signal(signal.SIGINT)  # Ctrl-C
        stopping = time.monotonic()
        assert up.wait(STOP_TIMEOUT_S) == 0, output.lines
        assert time.monotonic() - stopping < 10, "a process needed its kill after the grace period"
        assert survivors(children) == [], "processes outlived `pdserve up`"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        for pid in survivors(children):
            os.kill(pid, signal.SIGKILL)
