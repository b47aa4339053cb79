"""Which TensorFlow wheel an install gets: tensorflow-cpu on Linux x86-64, tensorflow elsewhere, the
CUDA build with the ``gpu`` extra; and no installed package pulls the CUDA build back in."""

from __future__ import annotations

import importlib.metadata
import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.auxil.modelstore import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

LINUX_X86_64 = {"sys_platform": "linux", "platform_machine": "x86_64", "platform_system": "Linux"}
OTHERS = [
    {"sys_platform": "darwin", "platform_machine": "arm64", "platform_system": "Darwin"},
    {"sys_platform": "darwin", "platform_machine": "x86_64", "platform_system": "Darwin"},
    {"sys_platform": "linux", "platform_machine": "aarch64", "platform_system": "Linux"},
    {"sys_platform": "win32", "platform_machine": "AMD64", "platform_system": "Windows"},
]
TENSORFLOWS = {"tensorflow", "tensorflow-cpu"}


def _wanted(requirements: list[str], platform: dict[str, str], extra: str = "") -> dict[str, Requirement]:
    env = {**default_environment(), **platform, "extra": extra}
    out = {}
    for line in requirements:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            out[canonicalize_name(req.name)] = req
    return out


def test_linux_x86_64_gets_tensorflow_cpu_and_not_the_cuda_build() -> None:
    wanted = _wanted(PROJECT["dependencies"], LINUX_X86_64)
    assert set(wanted) & TENSORFLOWS == {"tensorflow-cpu"}
    assert str(wanted["tensorflow-cpu"].specifier) == "<2.22,>=2.21"


@pytest.mark.parametrize("platform", OTHERS, ids=lambda p: f"{p['sys_platform']}-{p['platform_machine']}")
def test_other_platforms_get_tensorflow(platform: dict[str, str]) -> None:
    wanted = _wanted(PROJECT["dependencies"], platform)
    assert set(wanted) & TENSORFLOWS == {"tensorflow"}
    assert str(wanted["tensorflow"].specifier) == "<2.22,>=2.21"


def test_the_gpu_extra_adds_the_cuda_build_of_the_same_version() -> None:
    gpu = _wanted(PROJECT["optional-dependencies"]["gpu"], LINUX_X86_64, extra="gpu")
    assert gpu["tensorflow"].extras == {"and-cuda"}
    assert str(gpu["tensorflow"].specifier) == "<2.22,>=2.21"


def test_no_installed_dependency_requires_the_cuda_build() -> None:
    """keras, tensorboard, ai-edge-litert... must not pull ``tensorflow`` back in next to tensorflow-cpu."""
    env = {**default_environment(), **LINUX_X86_64, "extra": ""}
    pulling = []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name in {"labelgram", *TENSORFLOWS}:  # the project itself: checked from pyproject.toml above
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if canonicalize_name(req.name) == "tensorflow" and (
                req.marker is None or req.marker.evaluate(env)
            ):
                pulling.append(f"{name}: {line}")
    assert not pulling
