"""The container images agree with the chart: the user the chart runs as, the entrypoint it calls,
the tag suffix of the CPU image, and a build context that keeps every package the install needs."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import yaml

from tests.helm.conftest import CHART, REPO

DOCKERFILES = {"cuda": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}


def _instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_images_run_as_the_chart_user_with_the_pdserve_entrypoint():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    for variant, path in DOCKERFILES.items():
        steps = _instructions(path)
        final_stage = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
        assert ("USER", f"{uid}:{uid}") in final_stage, variant
        assert ("ENTRYPOINT", '["pdserve"]') in final_stage, variant
        assert any(op == "ENV" and "HOME=/tmp" in arg for op, arg in final_stage), variant  # read-only root fs


def test_gpu_image_installs_the_gpu_extras_on_a_cuda_base_and_cpu_image_pins_the_ci_torch():
    cuda = _instructions(DOCKERFILES["cuda"])
    assert cuda[0][0] == "ARG" and cuda[0][1].startswith("CUDA_BASE=nvidia/cuda:")
    assert all(arg.startswith("${CUDA_BASE}") for op, arg in cuda if op == "FROM")
    assert any('pip install "/src[gpu]"' in arg for op, arg in cuda if op == "RUN")
    makefile = (REPO / "Makefile").read_text()
    torch_spec = re.search(r"TORCH_SPEC \?= torch==(\S+)", makefile).group(1)
    assert f"ARG TORCH_VERSION={torch_spec}" in DOCKERFILES["cpu"].read_text()


def test_build_context_keeps_every_package_and_the_readme():
    ignored = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in [*packages, "pyproject.toml", project["project"]["readme"]]:
        assert (REPO / needed).exists(), needed
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed
