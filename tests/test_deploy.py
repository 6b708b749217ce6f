"""deploy.sh end to end, over SSH to a real sshd on a loopback port.

The test starts OpenSSH's sshd (Debian package `openssh-server`) in the
foreground with a throwaway host key and client key, so it runs as root (sshd
needs root to switch users, and logs in as the current user). The "server" is
this machine: the deployed daemon runs from DEPLOY_DIR under a temporary
directory on a free port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from .daemon import free_port
from .test_release import build_release

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
KEY = "deploy-test-signing-key-0123456789abcdef"
PASSWORD = "Correct-Horse-9"

pytestmark = [
    pytest.mark.skipif(
        not Path(SSHD).exists(),
        reason="sshd not installed (apt-get install openssh-server)",
    ),
    pytest.mark.skipif(
        shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="sshd runs as root in this test"),
]


@dataclass
class SshServer:
    port: int
    client_key: Path


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 with keys and config in tmp_path, stopped afterwards."""
    keys = tmp_path / "ssh"
    keys.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
            check=True,
            timeout=30,
        )
    (keys / "authorized_keys").write_text((keys / "client_key.pub").read_text())

    port = free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\nPidFile none\n"
    )

    # The privilege separation directory, normally made by the init system.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = (keys / "sshd.log").open("w")
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (keys / "sshd.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.1)
        yield SshServer(port, keys / "client_key")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@dataclass
class Target:
    """A deploy destination and the environment that deploy.sh gets."""

    directory: Path
    app_port: int
    env: dict[str, str]

    def deploy(self, **extra: str) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **extra}
        return subprocess.run(
            [str(ROOT / "deploy.sh"), "production"],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )

    @property
    def current(self) -> str:
        return os.readlink(self.directory / "current")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    def supervisor_pid(self) -> int | None:
        pidfile = self.directory / "shared" / "var" / "run" / "deeperhub.pid"
        try:
            return int(pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None


@pytest.fixture
def target(sshd: SshServer) -> Iterator[Target]:
    # A short path: Unix socket paths under var/run/ are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="dh-deploy-")) / "opt"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DEEPERHUB_", "DEPLOY_", "PROMETHEUS_", "PORT"))
    }
    env.update(
        {
            "DEPLOY_HOST": "127.0.0.1",
            "DEPLOY_USER": pwd.getpwuid(os.geteuid()).pw_name,
            "DEPLOY_DIR": str(directory),
            "DEPLOY_SSH_OPTS": (
                f"-p {sshd.port} -i {sshd.client_key} -o StrictHostKeyChecking=no "
                "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
            ),
            "DEPLOY_PYTHON": sys._base_executable,
            "DEPLOY_HEALTH_TIMEOUT": "30",
            "GUARDIAN_SECRET_KEY": KEY,
        }
    )
    app_port = free_port()
    env["DEPLOY_PORT"] = str(app_port)
    deployed = Target(directory, app_port, env)
    try:
        yield deployed
    finally:
        _stop_deployed(deployed)
        shutil.rmtree(directory.parent, ignore_errors=True)


def _stop_deployed(deployed: Target) -> None:
    """Stop whatever deploy.sh started, by its pidfile, killing it if needed."""
    pid = deployed.supervisor_pid()
    if pid is None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    # Workers die with the supervisor (PR_SET_PDEATHSIG).
    os.kill(pid, signal.SIGKILL)


def broken_release(good: Path, directory: Path) -> Path:
    """Return a copy of `good` whose acceptor exits at start."""
    unpacked = directory / "broken"
    with tarfile.open(good) as archive:
        archive.extractall(unpacked, filter="tar")
    (top,) = unpacked.iterdir()
    (top / "workers" / "acceptor" / "__main__.py").write_text(
        'raise SystemExit("broken on purpose")\n'
    )
    renamed = top.rename(unpacked / "deeperhub-0.0.0-broken")
    tarball = directory / "deeperhub-0.0.0-broken.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(renamed, arcname=renamed.name)
    return tarball


def login(url: str, name: str) -> int:
    response = httpx.post(
        url + "/api/auth/login", json={"username": name, "password": PASSWORD}
    )
    return response.status_code


def test_deploy_requires_secret_key(tmp_path: Path) -> None:
    env = {
        key: value for key, value in os.environ.items() if key != "GUARDIAN_SECRET_KEY"
    }
    env.update(DEPLOY_HOST="127.0.0.1", DEPLOY_USER="x", DEPLOY_DIR=str(tmp_path))
    result = subprocess.run(
        [str(ROOT / "deploy.sh"), "production"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "missing GUARDIAN_SECRET_KEY" in result.stderr


def test_deploy_rejects_unknown_environment() -> None:
    result = subprocess.run(
        [str(ROOT / "deploy.sh"), "staging"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "usage: ./deploy.sh production" in result.stderr


@pytest.mark.timeout(240)
def test_deploy_rollback_and_redeploy(target: Target, tmp_path: Path) -> None:
    """Deploy, fail a deploy and roll back, deploy again; the data stays."""
    # 1. First deploy: deploy.sh builds the release itself.
    first = target.deploy()
    assert first.returncode == 0, first.stderr[-4000:]
    release_one = target.current
    assert release_one.startswith("releases/")
    assert httpx.get(target.url + "/health").status_code == 200
    body = {"username": "keeper", "email": "k@example.test", "password": PASSWORD}
    registered = httpx.post(target.url + "/api/auth/register", json=body)
    assert registered.status_code == 201
    env_file = target.directory / "shared" / "deeperhub.env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert f"PORT='{target.app_port}'" in env_file.read_text()
    var_link = target.directory / release_one / "var"
    assert var_link.is_symlink()
    assert var_link.resolve() == (target.directory / "shared" / "var").resolve()
    first_pid = target.supervisor_pid()

    # 2. A release that cannot start: deploy.sh switches back and fails.
    good = build_release(tmp_path / "dist")
    broken = target.deploy(DEPLOY_RELEASE=str(broken_release(good, tmp_path)))
    assert broken.returncode == 1, broken.stderr[-4000:]
    assert "rolled back" in broken.stderr
    assert "broken on purpose" in broken.stderr  # the console log is shown
    assert target.current == release_one
    assert httpx.get(target.url + "/health").status_code == 200
    assert target.supervisor_pid() not in (None, first_pid)
    failed = [
        path.name
        for path in (target.directory / "releases").iterdir()
        if (path / "DEPLOY_FAILED").exists()
    ]
    assert len(failed) == 1
    assert failed[0].endswith("deeperhub-0.0.0-broken")

    # 3. Running it again deploys a new release; the database is kept.
    again = target.deploy(DEPLOY_RELEASE=str(good))
    assert again.returncode == 0, again.stderr[-4000:]
    assert target.current not in (release_one, f"releases/{failed[0]}")
    assert login(target.url, "keeper") == 200
    pid = target.supervisor_pid()
    assert pid is not None
    running = Path(f"/proc/{pid}/cwd").resolve()
    assert running == (target.directory / target.current).resolve()
    backups = list((target.directory / "shared" / "backups").glob("*.db"))
    assert len(backups) == 2
    assert KEY not in again.stderr + again.stdout
