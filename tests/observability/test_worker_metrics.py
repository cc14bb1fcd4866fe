"""Workers' /metrics on a real cluster: values move as they should, and promtool accepts them."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.registry import make_registry
from router.client import Client
from tests.helpers.tools import require_tool
from tests.integration.conftest import start_cluster, wait_idle


def wait_for_membership(registry_url: str, workers: set[str], timeout: float = 10.0) -> None:
    async def poll() -> None:
        registry = make_registry(registry_url)
        try:
            deadline = time.monotonic() + timeout
            while {r.info.worker_id for r in await registry.list_workers()} != workers:
                assert time.monotonic() < deadline, f"registry never showed exactly {workers}"
                await asyncio.sleep(0.05)
        finally:
            await registry.close()

    asyncio.run(poll())


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v for (n, lbls), v in samples(text).items() if n == name and all((k, str(x)) in lbls for k, x in labels.items())
    )


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster(1, 1)
    yield cluster
    cluster.stop()


def test_tokens_counted_equal_tokens_served(cluster):
    prefill = next(w for w in cluster.workers if w.name.startswith("prefill"))
    decode = next(w for w in cluster.workers if w.name.startswith("decode"))
    before_p = scrape(prefill.ready["metrics_address"])
    before_d = scrape(decode.ready["metrics_address"])
    served = 0
    with Client(cluster.address, timeout=60) as client:
        for i in range(4):
            served += len(client.generate([5 + i] * (20 + i), max_tokens=7, temperature=0, ignore_eos=True).token_ids)
    wait_idle(cluster)
    after_p = scrape(prefill.ready["metrics_address"])
    after_d = scrape(decode.ready["metrics_address"])

    def delta(name, before, after, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # Each request: its first token sampled on the prefill worker, the rest on the decode worker.
    assert delta("pdserve_generation_tokens_total", before_p, after_p) == 4
    assert delta("pdserve_generation_tokens_total", before_d, after_d) == served - 4
    assert delta("pdserve_kv_transfer_bytes_total", before_p, after_p, direction="send") > 0
    assert delta("pdserve_kv_transfer_bytes_total", before_p, after_p, direction="send") == delta(
        "pdserve_kv_transfer_bytes_total", before_d, after_d, direction="recv"
    )
    assert delta("pdserve_kv_transfer_duration_seconds_count", before_d, after_d, direction="recv") == 4
    assert value(after_d, "pdserve_worker_role", role="decode") == 1
    assert value(after_d, "pdserve_kv_blocks", state="used") == 0
    assert value(after_d, "pdserve_kv_blocks") == 256  # used + cached + free
    assert value(after_d, "pdserve_kv_blocks", state="cached") > 0  # the prompts' full blocks stay cached
    # Every prefill token of every MoE layer was routed to top-2 experts (tiny preset: 3 MoE layers).
    routed = value(after_p, "pdserve_moe_routed_tokens_total") - value(before_p, "pdserve_moe_routed_tokens_total")
    assert routed > 0 and routed % (3 * 2) == 0
    assert delta("pdserve_engine_step_duration_seconds_count", before_p, after_p, kind="prefill") >= 4


def test_failed_transfer_is_counted_with_its_reason(cluster):
    """A prefill worker with other weights (seed 1) fails the KV handshake; the request still completes."""
    decode = next(w for w in cluster.workers if w.name.startswith("decode"))
    before = scrape(decode.ready["metrics_address"])
    argv = ["worker", "--role", "prefill", "--worker-id", "odd-prefill", "--seed", "1", "--registry"]
    argv += [cluster.registry_url, "--num-kv-blocks", "256", "--max-model-len", "1024"]
    odd = cluster._spawn("odd-prefill", argv)
    cluster.workers.append(odd)
    odd.wait_ready(60)
    original = next(w for w in cluster.workers if w.name.startswith("prefill"))
    original.popen.terminate()  # only the odd prefill worker is left to pick
    original.popen.wait()
    wait_for_membership(cluster.registry_url, {"decode-1", "odd-prefill"})
    time.sleep(0.6)  # the router syncs from the registry every 0.25 s
    with Client(cluster.address, timeout=60) as client:
        result = client.generate([7] * 30, max_tokens=4, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 4  # retried with the prompt prefilled on the decode worker
    after = scrape(decode.ready["metrics_address"])
    failed = value(after, "pdserve_kv_transfer_failures_total", reason="handshake_mismatch")
    assert failed - value(before, "pdserve_kv_transfer_failures_total", reason="handshake_mismatch") >= 1


def test_promtool_accepts_every_workers_metrics(cluster):
    require_tool("promtool", "promtool not installed (Debian package prometheus)")
    for worker in cluster.workers:
        if worker.popen.poll() is not None:
            continue
        text = scrape(worker.ready["metrics_address"])
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_router_metrics_and_request_log(cluster):
    address = cluster.router.ready["metrics_address"]
    before = scrape(address)
    tokens = 0
    with Client(cluster.address, timeout=60) as client:
        for i in range(3):
            tokens += len(client.generate([9 + i] * 12, max_tokens=5, temperature=0, ignore_eos=True).token_ids)
        with pytest.raises(Exception, match="prompt is empty"):
            client.generate("", max_tokens=5)
    after = scrape(address)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pdserve_router_requests_total", status="OK") == 3
    assert delta("pdserve_router_requests_total", status="INVALID_ARGUMENT") == 1
    assert delta("pdserve_router_generation_tokens_total") == tokens == 15
    assert delta("pdserve_router_time_to_first_token_seconds_count") == 3
    assert delta("pdserve_router_inter_token_latency_seconds_count") == tokens - 3
    assert delta("pdserve_router_e2e_request_latency_seconds_count") == 3
    assert delta("pdserve_router_routing_decisions_total") == 3
    assert value(after, "pdserve_router_inflight_requests") == 0
    logs = [line for line in cluster.router.tail if "status=OK" in line and "completion_tokens=5" in line]
    assert len(logs) >= 3 and all("prompt_tokens=" in line for line in logs)
    promtool = require_tool("promtool", "promtool not installed (Debian package prometheus)")
    check = subprocess.run([promtool, "check", "metrics"], input=after, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_role_flip_shows_in_role_epoch_and_flip_counters(cluster):
    from cluster.planner import set_role

    decode = next(w for w in cluster.workers if w.name.startswith("decode") and w.popen.poll() is None)

    async def flip_and_back():
        registry = make_registry(cluster.registry_url)
        try:
            await set_role(registry, decode.ready["worker_id"], "mixed", drain_timeout_s=10)
            mid = scrape(decode.ready["metrics_address"])
            await set_role(registry, decode.ready["worker_id"], "decode", drain_timeout_s=10)
            return mid
        finally:
            await registry.close()

    mid = asyncio.run(flip_and_back())
    end = scrape(decode.ready["metrics_address"])
    assert value(mid, "pdserve_worker_role", role="mixed") == 1 and value(mid, "pdserve_worker_role_epoch") == 2
    assert value(end, "pdserve_worker_role", role="decode") == 1 and value(end, "pdserve_worker_role_epoch") == 3
    assert value(end, "pdserve_role_flips_total", from_role="decode", to_role="mixed", result="ok") == 1
    assert value(end, "pdserve_role_flips_total", from_role="mixed", to_role="decode", result="ok") == 1
    assert value(end, "pdserve_role_flip_duration_seconds_count") == 2


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can contain: samples, and families announced without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_and_alert_queries_name_only_exported_metrics(cluster):
    import json
    import re
    from pathlib import Path

    chart = Path(__file__).resolve().parents[2] / "helm" / "pdserve"
    dashboard = json.loads((chart / "dashboards" / "pdserve.json").read_text())

    def exprs(node):
        if isinstance(node, dict):
            for key, child in node.items():
                if key == "expr" and isinstance(child, str):
                    yield child
                else:
                    yield from exprs(child)
        elif isinstance(node, list):
            for child in node:
                yield from exprs(child)

    queries = list(exprs(dashboard))
    assert len(queries) >= 10, "the dashboard should have panels for every signal the issue lists"
    rules = (chart / "templates" / "prometheusrule.yaml").read_text()
    queries += re.findall(r"expr:\s*(.+)", rules)
    exported = set()
    for process in [cluster.router, *cluster.workers]:
        if process.alive():
            exported |= exported_names(scrape(process.ready["metrics_address"]))
    used = {name for query in queries for name in re.findall(r"\bpdserve_[a-zA-Z0-9_]+", query)}
    assert used, "no pdserve metric found in the queries"
    missing = sorted(used - exported)
    assert not missing, f"queries name metrics no process exports: {missing}"
