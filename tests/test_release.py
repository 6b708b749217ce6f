"""bin/deeperhub-release: the tarball, and a release run from another directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from .daemon import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
KEY = "release-test-signing-key-of-at-least-32-bytes"


def build_release(output: Path) -> Path:
    """Run bin/deeperhub-release and return the tarball it printed."""
    result = subprocess.run(
        [str(ROOT / "bin" / "deeperhub-release"), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tarball = Path(result.stdout.strip().splitlines()[-1])
    assert tarball.is_file()
    return tarball


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_release(tmp_path_factory.mktemp("dist"))


def locked_names() -> set[str]:
    names = set()
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            names.add(normalize(line.split("==")[0]))
    return names


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        normalize(re.split(r"[<>=!~ \[;]", requirement)[0])
        for requirement in project["dependencies"]
    }
    lock_lines = [
        line
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    pinned = re.compile(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+!-]+")
    assert [line for line in lock_lines if not pinned.fullmatch(line)] == []
    # A dependency added to pyproject.toml needs `bin/deeperhub-release --lock`.
    assert sorted(declared - locked_names()) == []


@pytest.mark.timeout(180)
def test_tarball_contents(tarball: Path) -> None:
    with tarfile.open(tarball) as archive:
        members = {member.name: member for member in archive.getmembers()}
    top = tarball.name.removesuffix(".tar.gz")
    names = {name.removeprefix(top + "/") for name in members}
    assert all(name.startswith(top) for name in members)

    for required in (
        "RELEASE",
        "requirements.lock",
        "bin/deeperhub",
        "bin/deeperhub-setup",
        "deeperhub/cli.py",
        "supervisor/main.py",
        "workers/acceptor/__main__.py",
        "etc/deeperhub.toml",
        "etc/prometheus/alerts.yml",
        "etc/grafana/deeperhub.json",
        "etc/systemd/deeperhub.service",
    ):
        assert required in names, required
    for folder in ("var/db", "var/log", "var/run"):
        assert members[f"{top}/{folder}"].isdir()
    assert not [name for name in names if "__pycache__" in name]
    assert not [name for name in names if name.startswith((".venv", "tests"))]

    wheels = {
        normalize(name.removeprefix("wheels/").split("-")[0])
        for name in names
        if name.startswith("wheels/") and name.endswith(".whl")
    }
    assert wheels == locked_names()


@pytest.fixture
def unpacked(tarball: Path) -> Iterator[Path]:
    """The release unpacked under a new directory, stopped after the test."""
    # A short path: Unix socket paths under var/run/ are limited to 107 bytes.
    target = Path(tempfile.mkdtemp(prefix="dh-release-"))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(target, filter="tar")
        (release,) = target.iterdir()
        try:
            yield release
        finally:
            # Stops a daemon the test may have left running; harmless otherwise.
            if (release / ".venv").exists():
                run(release, "bin/deeperhub", "stop", timeout=70)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def run(
    release: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEEPERHUB_", "PROMETHEUS_", "VIRTUAL_ENV"))
    }
    environ.update(env or {})
    return subprocess.run(
        [str(release / args[0]), *args[1:]],
        cwd="/",
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_release_runs_from_another_directory(unpacked: Path) -> None:
    python = sys._base_executable  # the interpreter behind the test venv
    setup = run(unpacked, "bin/deeperhub-setup", "--python", python, timeout=150)
    assert setup.returncode == 0, setup.stderr
    venv_config = (unpacked / ".venv" / "pyvenv.cfg").read_text()
    assert str(ROOT) not in venv_config

    version = run(unpacked, "bin/deeperhub", "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("DeeperHub ")

    port = free_port()
    env = {"PORT": str(port), "GUARDIAN_SECRET_KEY": KEY}
    started = run(unpacked, "bin/deeperhub", "daemon", env=env)
    assert started.returncode == 0, started.stderr
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    assert health.status_code == 200

    # The daemon runs the release's code and venv, and keeps data in its var/.
    pid = int((unpacked / "var" / "run" / "deeperhub.pid").read_text())
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert command[0].decode().startswith(str(unpacked / ".venv"))
    assert Path(f"/proc/{pid}/cwd").resolve() == unpacked.resolve()
    assert (unpacked / "var" / "db" / "deeper_hub.db").exists()

    stopped = run(unpacked, "bin/deeperhub", "stop", timeout=70)
    assert stopped.returncode == 0, stopped.stderr


def test_setup_rejects_other_python(unpacked: Path, tmp_path: Path) -> None:
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\necho 3.9\n")
    fake.chmod(0o755)
    result = run(unpacked, "bin/deeperhub-setup", "--python", str(fake))
    wanted = (unpacked / "RELEASE").read_text().split("python=")[1].split()[0]
    assert result.returncode == 1
    assert f"are for Python {wanted}" in result.stderr
    assert not (unpacked / ".venv").exists()


def test_setup_outside_release() -> None:
    result = subprocess.run(
        [str(ROOT / "bin" / "deeperhub-setup")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "not an unpacked release" in result.stderr
