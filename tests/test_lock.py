"""requirements/lock.txt is current with pyproject.toml and satisfies it everywhere it claims to."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lorakit_lock", ROOT / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

# The lock is universal; these are the environments it must serve (CPython 3.10+, Linux and macOS).
ENVIRONMENTS = [
    {
        "python_version": v,
        "python_full_version": f"{v}.0",
        "sys_platform": plat,
        "platform_system": system,
        "platform_machine": machine,
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for v in ("3.10", "3.11", "3.12", "3.13")
    for plat, system, machine in (
        ("linux", "Linux", "x86_64"),
        ("linux", "Linux", "aarch64"),
        ("darwin", "Darwin", "arm64"),
    )
]


def _pins_for(environment: dict) -> dict:
    pins = {}
    for req in lock.locked():
        if req.marker is None or req.marker.evaluate(environment):
            name = canonicalize_name(req.name)
            assert name not in pins, f"{name} is locked twice for {environment['python_version']}"
            pins[name] = str(req.specifier)[2:]
    return pins


def test_lock_is_current_with_pyproject():
    assert lock.stored_digest() == lock.inputs_digest(), (
        "pyproject.toml's dependencies (or requirements/torch.txt, cuda-only.txt) changed since "
        "requirements/lock.txt was generated: run `make lock` and commit the result"
    )


def test_a_changed_dependency_range_makes_the_lock_stale(tmp_path, monkeypatch):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    text = (tmp_path / "pyproject.toml").read_text(encoding="utf-8")
    (tmp_path / "pyproject.toml").write_text(text.replace('"peft>=0.17,<0.22"', '"peft>=0.17,<0.23"'), encoding="utf-8")
    assert lock.inputs_digest() == lock.stored_digest()
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    assert lock.inputs_digest() != lock.stored_digest()


@pytest.mark.parametrize(
    "environment", ENVIRONMENTS, ids=lambda e: f"py{e['python_version']}-{e['sys_platform']}-{e['platform_machine']}"
)
def test_every_requirement_is_satisfied_by_one_locked_version(environment):
    pins = _pins_for(environment)
    wanted = lock.inputs()
    requirements = [*wanted["dependencies"], *wanted["build-system"]]
    requirements += [r for extra in wanted["extras"].values() for r in extra]
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        name = canonicalize_name(req.name)
        if name == "torch":  # installed from requirements/torch.txt, outside the hashed lock
            (pinned,) = [Requirement(line) for line in wanted["torch"]]
            version = str(pinned.specifier)[2:]
        else:
            assert name in pins, f"{text} has no locked version for this environment"
            version = pins[name]
        assert req.specifier.contains(version, prereleases=True), f"locked {name}=={version} is outside {text}"


def test_every_pin_is_exact_and_hashed_and_cuda_is_left_out():
    text = lock.LOCK.read_text(encoding="utf-8")
    pins = lock.locked()
    blocks = [b for b in text.replace("\\\n", " ").splitlines() if b and b[0] not in " #"]
    assert len(blocks) == len(pins) > 50
    for block, req in zip(blocks, pins):
        assert str(req.specifier).startswith("==") and "--hash=sha256:" in block, block[:80]
    cuda = set(lock._lines(lock.CUDA_ONLY)) | {"torch"}
    assert not cuda & {canonicalize_name(r.name) for r in pins}
