"""The Helm chart: lint, render every variant, validate against Kubernetes schemas, and check the
properties that matter (GPU requests, probes, NetworkPolicy selectors, Services, security, the
arguments the pdserve CLI accepts), and that bad values fail with the schema's message."""

from __future__ import annotations

import json
import subprocess

import pytest

from cluster.cli import build_parser
from tests.helm.conftest import CHART, CI_VALUES, NAMESPACE, RELEASE, VARIANTS, Rendered, helm_template
from tests.helm.crd_schemas import CRD_SCHEMAS
from tests.helpers.tools import require_tool

MONITORING_APIS = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
KUBE_VERSIONS = ("1.27.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas
VARIANT_IDS = [v or "default" for v in VARIANTS]


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _worker(rendered: Rendered) -> tuple[dict, dict, dict]:
    sts = rendered.get("StatefulSet", "worker")
    spec = sts["spec"]["template"]["spec"]
    return sts, spec, _container(spec, "worker")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _expand(args: list[str]) -> list[str]:
    """Stand-ins for the $(VAR) references the kubelet expands."""
    values = {"$(POD_NAME)": "t-pdserve-worker-0", "$(POD_IP)": "10.1.2.3", "$(REGISTRY_URL)": "redis://r:6379/0"}
    for ref, value in values.items():
        args = [a.replace(ref, value) for a in args]
    return args


# ----------------------------------------------------------------------------- lint and schemas
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_helm_lint_is_clean(helm, variant):
    files = ["-f", str(CI_VALUES / f"{variant}-values.yaml")] if variant else []
    out = subprocess.run(
        [helm, "lint", "--strict", "--kube-version", KUBE_VERSIONS[0], str(CHART), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_every_manifest_validates_against_kubernetes_schemas(render, variant):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    jsonschema = pytest.importorskip("jsonschema")
    rendered = render(variant, *MONITORING_APIS)
    assert rendered.docs
    for doc in rendered.docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert doc["metadata"].get("namespace", NAMESPACE) == NAMESPACE, where
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(map(str, err.path))
                pytest.fail(f"{where} is invalid for Kubernetes {version} at {path}: {err.message}")


def _merged(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        both_maps = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both_maps else value
    return merged


def test_values_files_satisfy_the_values_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for path in sorted(CI_VALUES.glob("*-values.yaml")):  # helm merges a variant over the defaults
        jsonschema.validate(_merged(defaults, yaml.safe_load(path.read_text())), schema)


def test_schema_enums_follow_the_engine():
    """GPUs per pod are the expert-parallel sizes the engine accepts for 64 experts; presets exist."""
    from engine.config import PRESET_NAMES
    from engine.parallel import supported_ep_sizes

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert schema["workers"]["properties"]["gpusPerPod"]["enum"] == list(supported_ep_sizes(64))
    assert schema["model"]["properties"]["preset"]["enum"] == list(PRESET_NAMES)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["router.replicas=-1"], "at '/router/replicas': minimum: got -1, want 0"),
        (["workers.roles.decode=-2"], "at '/workers/roles/decode': minimum: got -2, want 0"),
        (["workers.roles.encoder=1"], "at '/workers/roles': additional properties 'encoder' not allowed"),
        (["workers.gpusPerPod=3"], "at '/workers/gpusPerPod': value must be one of 1, 2, 4, 8, 16, 32, 64"),
        (["workers.gpusPerPod=128"], "at '/workers/gpusPerPod': value must be one of 1, 2, 4, 8, 16, 32, 64"),
        (["workers.device=tpu"], "at '/workers/device': value must be one of 'cuda', 'cpu'"),
        (["workers.prefillMaxNumBatchedTokens=0"], "at '/workers/prefillMaxNumBatchedTokens': minimum: got 0, want 1"),
        (["model.source=s3"], "at '/model/source': value must be one of 'preset', 'pvc', 'hostPath', 'url'"),
        (["monitoring.enabled=maybe"], "at '/monitoring/enabled': value must be one of 'auto', true, false"),
        (["preflight.gpus=1"], "at '/preflight/gpus': minimum: got 1, want 2"),
        (["redis.external.url=http://x"], "at '/redis/external/url'"),
        (["workerz.replicas=2"], "additional properties 'workerz' not allowed"),
    ],
)
def test_bad_values_fail_with_the_schema_message(helm, settings, message):
    out = helm_template(helm, *[arg for s in settings for arg in ("--set", s)])
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr
    assert message in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["workers.roles.prefill=0", "workers.roles.decode=0"], "at least one worker is needed"),
        (["workers.roles.decode=0"], "needs a decode or mixed worker"),
        (["redis.enabled=false"], "set redis.external.url or redis.external.existingSecret"),
        (["apiKey.enabled=true"], "set apiKey.existingSecret or apiKey.keys"),
        (["model.source=pvc"], "set model.pvc.claimName"),
        (["workers.device=cpu", "workers.kvBackend=nccl"], "nccl needs workers.device cuda"),
    ],
)
def test_inconsistent_values_fail_with_a_named_value(helm, settings, message):
    out = helm_template(helm, *[arg for s in settings for arg in ("--set", s)])
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


# ----------------------------------------------------------------------------- workers
@pytest.mark.parametrize(("variant", "replicas", "gpus"), [(None, 2, 1), ("gpu-4x2", 4, 2), ("production", 6, 8)])
def test_workers_request_gpus_per_pod_and_pass_the_expert_parallel_size(render, variant, replicas, gpus):
    sts, spec, worker = _worker(render(variant))
    assert sts["spec"]["replicas"] == replicas
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert _env(worker)["PDSERVE_EXPERT_PARALLEL_SIZE"]["value"] == str(gpus)
    assert sts["spec"]["template"]["metadata"]["annotations"]["pdserve.io/expert-parallel-size"] == str(gpus)
    assert "--device=cuda" in worker["args"] and "--kv-backend=nccl" in worker["args"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in worker["volumeMounts"]


def test_cpu_trial_requests_no_gpu_and_uses_gloo_and_the_cpu_image(render):
    rendered = render("cpu-trial")
    assert "nvidia.com/gpu" not in json.dumps(rendered.docs)
    _, spec, worker = _worker(rendered)
    assert "--device=cpu" in worker["args"] and "--kv-backend=gloo" in worker["args"]
    assert "--model=tiny" in worker["args"]
    assert worker["image"].endswith("-cpu")
    assert "tolerations" not in spec and "runtimeClassName" not in spec
    preflight = _container(rendered.get("Job", "preflight")["spec"]["template"]["spec"], "preflight")
    assert preflight["command"] == ["pdserve", "preflight"] and "--device=cpu" in preflight["args"]
    assert not any(v["name"] == "model" for v in spec["volumes"])  # the preset needs no volume


def test_workers_advertise_their_pod_ip_and_register_in_redis(render):
    _, _, worker = _worker(render())
    env = _env(worker)
    assert "--host=0.0.0.0" in worker["args"] and "--advertise-host=$(POD_IP)" in worker["args"]
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "--worker-id=$(POD_NAME)" in worker["args"]
    assert env["REGISTRY_URL"]["value"] == f"redis://{RELEASE}-pdserve-redis:6379/0"
    assert "--registry=$(REGISTRY_URL)" in worker["args"]


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_rendered_commands_are_accepted_by_the_pdserve_cli(render, variant):
    rendered = render(variant)
    parser = build_parser()
    _, _, worker = _worker(rendered)
    args = parser.parse_args(["worker", "--role", "prefill", *_expand(worker["args"])])
    assert args.advertise_host == "10.1.2.3" and args.host == "0.0.0.0"
    router = _container(rendered.get("Deployment", "router")["spec"]["template"]["spec"], "router")
    assert router["command"] == ["pdserve", "router"]
    args = parser.parse_args(["router", *_expand(router["args"])])
    assert args.registry == "redis://r:6379/0" and args.metrics_port == 9090
    assert args.block_size == int(next(a for a in worker["args"] if a.startswith("--block-size=")).split("=")[1])
    if any(d["metadata"]["name"].endswith("-planner") for d in rendered.of_kind("Deployment")):
        planner = _container(rendered.get("Deployment", "planner")["spec"]["template"]["spec"], "planner")
        parser.parse_args(["planner", *_expand(planner["args"])])
    job = _container(rendered.get("Job", "preflight")["spec"]["template"]["spec"], "preflight")
    if job["command"][0] == "pdserve":
        parser.parse_args(["preflight", *job["args"]])
    else:  # the nccl-tests image: our gate script
        assert job["command"] == ["/bin/sh", "/opt/pdserve/scripts/nccl_tests.sh"]


# ----------------------------------------------------------------------------- probes
def test_worker_probes_are_grpc_health_checks(render):
    _, _, worker = _worker(render())
    port = next(p["containerPort"] for p in worker["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["grpc"]["port"] == port
    assert worker["startupProbe"]["grpc"]["service"] == "pdserve.v1.Worker"
    assert worker["readinessProbe"]["grpc"]["service"] == "pdserve.v1.Worker"
    # Loading a 21B model takes minutes: the startup probe allows that before liveness applies.
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60


def test_router_readiness_is_the_generation_health_and_liveness_never_depends_on_workers(render):
    router = _container(render().get("Deployment", "router")["spec"]["template"]["spec"], "router")
    port = next(p["containerPort"] for p in router["ports"] if p["name"] == "grpc")
    assert router["readinessProbe"]["grpc"] == {"port": port, "service": "pdserve.v1.Generation"}
    assert router["livenessProbe"]["tcpSocket"]["port"] == port
    assert router["startupProbe"]["tcpSocket"]["port"] == port


def test_probe_overrides_merge_over_the_defaults(render):
    rendered = render(None, "--set", "workers.probes.startup.failureThreshold=30")
    _, _, worker = _worker(rendered)
    assert worker["startupProbe"]["failureThreshold"] == 30
    assert worker["startupProbe"]["grpc"]["service"] == "pdserve.v1.Worker"


# ----------------------------------------------------------------------------- Services and NetworkPolicy
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_only_the_router_service_can_be_exposed(render, variant):
    services = {s["metadata"]["name"]: s["spec"] for s in render(variant).of_kind("Service")}
    worker = services[f"{RELEASE}-pdserve-worker"]
    assert worker.get("type", "ClusterIP") == "ClusterIP" and worker["clusterIP"] == "None"
    for name, spec in services.items():
        if name != f"{RELEASE}-pdserve-router":
            assert spec.get("type", "ClusterIP") == "ClusterIP", name
    router_ports = {p["name"] for p in services[f"{RELEASE}-pdserve-router"]["ports"]}
    assert router_ports == {"grpc", "http"}  # /metrics has its own ClusterIP Service


def test_production_router_is_a_load_balancer_with_hpa_and_no_fixed_replicas(render):
    rendered = render("production")
    assert rendered.get("Service", "router")["spec"]["type"] == "LoadBalancer"
    assert "replicas" not in rendered.get("Deployment", "router")["spec"]
    hpa = rendered.get("HorizontalPodAutoscaler", "router")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-pdserve-router"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _pod_labels(rendered: Rendered) -> dict[str, dict]:
    labels = {}
    for workload, _ in rendered.pod_specs():
        labels[workload["metadata"]["labels"]["app.kubernetes.io/component"]] = workload["spec"]["template"][
            "metadata"
        ]["labels"]
    return labels


def _allowed(policy: dict, source: dict, port: str) -> bool:
    """Does `policy` let a pod of this release with labels `source` reach `port`?"""
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if peers is None or any(
            "podSelector" in p and "namespaceSelector" not in p and _selects(p["podSelector"], source) for p in peers
        ):
            return True
    return False


def test_network_policies_let_only_the_router_in_and_workers_hear_router_and_peers(render):
    rendered = render("api-key")  # routerFrom restricted to an ingress controller
    pods = _pod_labels(rendered)
    policies = {p["metadata"]["name"].removeprefix(f"{RELEASE}-pdserve-"): p for p in rendered.of_kind("NetworkPolicy")}
    # Every long-running pod of the release is covered by a policy.
    for component in ("router", "worker", "redis", "planner"):
        assert any(_selects(p["spec"]["podSelector"], pods[component]) for p in policies.values()), component
    worker_policy, router_policy = policies["worker"], policies["router"]
    assert _selects(worker_policy["spec"]["podSelector"], pods["worker"])
    assert not _selects(worker_policy["spec"]["podSelector"], pods["router"])
    assert _allowed(worker_policy, pods["worker"], "kv") and _allowed(worker_policy, pods["worker"], "grpc")
    assert _allowed(worker_policy, pods["router"], "grpc") and _allowed(worker_policy, pods["planner"], "grpc")
    assert not _allowed(worker_policy, pods["router"], "kv")
    assert not _allowed(worker_policy, pods["smoke-test"], "grpc")
    assert not _allowed(worker_policy, {"app": "stranger"}, "grpc")
    # The router: restricted to routerFrom, plus helm test's smoke test.
    assert _allowed(router_policy, pods["smoke-test"], "http")
    assert not _allowed(router_policy, {"app": "stranger"}, "http")
    assert _allowed(policies["redis"], pods["worker"], "redis") and not _allowed(
        policies["redis"], pods["smoke-test"], "redis"
    )
    assert policies["planner"]["spec"]["ingress"] == []


def test_default_router_is_open_to_any_client(render):
    policy = render().get("NetworkPolicy", "router")
    rule = next(r for r in policy["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"])
    assert "from" not in rule


# ----------------------------------------------------------------------------- registry, model, API key
def test_external_redis_replaces_the_bundled_one(render):
    rendered = render("external-redis")
    assert not [d for d in rendered.docs if "redis" in d["metadata"]["name"]]
    _, spec, worker = _worker(rendered)
    assert _env(worker)["REGISTRY_URL"]["value"] == "redis://redis.shared.svc.cluster.local:6379/3"
    claim = next(v for v in spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"]
    assert claim == {"claimName": "ernie-models", "readOnly": True}
    secret = render(None, "--set", "redis.enabled=false", "--set", "redis.external.existingSecret=redis-url")
    ref = _env(_worker(secret)[2])["REGISTRY_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "redis-url", "key": "url"}


def test_bundled_redis_persistence_is_optional(render):
    assert "volumeClaimTemplates" not in render().get("StatefulSet", "redis")["spec"]
    redis = render("production").get("StatefulSet", "redis")
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "yes" in _container(redis["spec"]["template"]["spec"], "redis")["args"]


def test_model_from_url_is_copied_by_init_containers_and_the_router_takes_only_tokenizer_files(render):
    rendered = render()
    _, spec, worker = _worker(rendered)
    (fetch,) = spec["initContainers"]
    assert "--source=hf://baidu/ERNIE-4.5-21B-A3B-PT" in fetch["args"]
    assert not [a for a in fetch["args"] if a.startswith("--include")]
    assert "--model=/models/ERNIE-4.5-21B-A3B-PT" in worker["args"]
    router_spec = rendered.get("Deployment", "router")["spec"]["template"]["spec"]
    includes = [a for a in router_spec["initContainers"][0]["args"] if a.startswith("--include")]
    assert "--include=*.json" in includes and not any("safetensors" in a for a in includes)
    token = _env(_worker(render("production"))[1]["initContainers"][0])["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "hf-token", "key": "token"}


def test_model_from_host_path(render):
    _, spec, _ = _worker(render("monitoring"))
    assert next(v for v in spec["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/mnt/models"
    assert "initContainers" not in spec


def test_api_keys_come_from_a_secret_mounted_into_the_router(render):
    rendered = render("api-key")
    secret = rendered.get("Secret", "api-keys")
    assert secret["stringData"]["api-keys"].split() == ["sk-pdserve-trial-0001", "sk-pdserve-trial-0002"]
    spec = rendered.get("Deployment", "router")["spec"]["template"]["spec"]
    router = _container(spec, "router")
    assert "--api-key-file=/etc/pdserve/api-keys/api-keys" in router["args"]
    volume = next(v for v in spec["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == f"{RELEASE}-pdserve-api-keys"
    assert "checksum/api-keys" in rendered.get("Deployment", "router")["spec"]["template"]["metadata"]["annotations"]
    smoke = _container(rendered.get("Job", "smoke-test")["spec"]["template"]["spec"], "smoke-test")
    assert "--api-key-file=/etc/pdserve/api-keys/api-keys" in smoke["args"]
    existing = render("production")
    assert not existing.of_kind("Secret")
    volume = next(
        v
        for v in existing.get("Deployment", "router")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "api-keys"
    )
    assert volume["secret"]["secretName"] == "pdserve-api-keys"
    assert "--api-key-file" not in json.dumps(render().get("Deployment", "router"))


# ----------------------------------------------------------------------------- security, PDB, tests
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_every_container_runs_locked_down(render, variant):
    for workload, spec in render(variant).pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "add" not in context["capabilities"]
            assert not context.get("privileged", False)


def test_disruption_budgets_cover_router_and_workers(render):
    rendered = render()
    pods = _pod_labels(rendered)
    for component in ("router", "worker"):
        pdb = rendered.get("PodDisruptionBudget", component)
        assert _selects(pdb["spec"]["selector"], pods[component])
        assert pdb["spec"]["maxUnavailable"] == 1


def test_helm_test_hooks_are_the_preflight_and_the_smoke_test(render):
    rendered = render("gpu-4x2")
    hooks = {
        d["metadata"]["name"]: d for d in rendered.docs if d["metadata"].get("annotations", {}).get("helm.sh/hook")
    }
    assert set(hooks) == {f"{RELEASE}-pdserve-preflight", f"{RELEASE}-pdserve-smoke-test"}
    job = hooks[f"{RELEASE}-pdserve-preflight"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "test"
    preflight = _container(job["spec"]["template"]["spec"], "preflight")
    assert preflight["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--min-busbw=sendrecv=200" in preflight["args"] and "--min-busbw=all_reduce=200" in preflight["args"]
    nccl = _container(render("production").get("Job", "preflight")["spec"]["template"]["spec"], "preflight")
    assert nccl["image"] == "ghcr.io/example/nccl-tests:2.13"
    assert nccl["args"][:3] == ["8", "300", "350"] and nccl["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert not render(None, "--set", "preflight.enabled=false").of_kind("Job")


# ----------------------------------------------------------------------------- monitoring
def test_monitoring_auto_follows_the_prometheus_operator(render):
    kinds = {"ServiceMonitor", "PrometheusRule"}
    assert not kinds & {d["kind"] for d in render().docs}
    present = render(None, *MONITORING_APIS)
    assert kinds <= {d["kind"] for d in present.docs}
    assert present.get("ConfigMap", "dashboard")
    assert not kinds & {d["kind"] for d in render(None, *MONITORING_APIS, "--set", "monitoring.enabled=false").docs}


def test_service_monitors_scrape_the_metrics_port_of_existing_services(render):
    rendered = render("monitoring")
    services = rendered.of_kind("Service")
    for monitor in rendered.of_kind("ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        matched = [s for s in services if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert len(matched) == 1, monitor["metadata"]["name"]
        assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
        assert matched[0]["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_alerts_cover_ttft_transfers_workers_and_kv(render):
    rule = render("monitoring").get("PrometheusRule", "")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"PdserveTTFTP99High", "PdserveKVTransferFailures", "PdserveWorkerDown", "PdserveKVCacheNearFull"} <= set(
        alerts
    )
    assert alerts["PdserveTTFTP99High"]["expr"].endswith("> 1.5")
    assert "pdserve_router_time_to_first_token_seconds_bucket" in alerts["PdserveTTFTP99High"]["expr"]
    assert f'job="{RELEASE}-pdserve-worker", namespace="{NAMESPACE}"' in alerts["PdserveWorkerDown"]["expr"]
    assert alerts["PdserveWorkerDown"]["expr"].endswith("< 2")
    for alert in alerts.values():
        assert alert["expr"].count("(") == alert["expr"].count(")")
        assert "{{" not in alert["expr"]


def test_alert_rules_and_dashboard_queries_pass_promtool(render, tmp_path):
    promtool = require_tool("promtool", "promtool not installed (Debian's prometheus package)")
    import yaml

    rule = render("monitoring").get("PrometheusRule", "")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 5 rules found" in out.stdout
    # The dashboard's queries parse too: each becomes a recording rule ($namespace made literal).
    dashboard = json.loads((CHART / "dashboards" / "pdserve.json").read_text())
    exprs = [t["expr"].replace("$namespace", NAMESPACE) for p in dashboard["panels"] for t in p.get("targets", [])]
    records = [{"record": f"pdserve:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_is_grafana_json_over_pdserve_metrics(render):
    configmap = render("monitoring").get("ConfigMap", "dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["pdserve.json"])
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"] for p in panels).lower()
    for needed in (
        "request rate",
        "time to first token",
        "inter-token",
        "per role",
        "kv usage",
        "bandwidth",
        "failures",
        "role timeline",
        "expert load",
    ):
        assert needed in titles, needed
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "pdserve_" in target["expr"], panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_notes_explain_how_to_reach_the_router_and_run_the_preflight(helm):
    out = subprocess.run(
        [
            helm,
            "install",
            RELEASE,
            str(CHART),
            "--dry-run=client",
            "-n",
            NAMESPACE,
            "-f",
            str(CI_VALUES / "gpu-4x2-values.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{RELEASE}-pdserve-router" in notes
    assert f"helm test {RELEASE}" in notes
    assert "PDSERVE_EXPERT_PARALLEL_SIZE=2" in notes  # gpusPerPod > 1: the not-yet-built multi-rank worker
    role_list = notes.split("sh -c '", 1)[1].split("'", 1)[0].replace('"$REGISTRY_URL"', "redis://r:6379/0").split()
    assert role_list[0] == "pdserve"
    build_parser().parse_args(role_list[1:])  # the command NOTES print is one the CLI accepts
