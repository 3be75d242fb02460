"""Fixtures for the pipeline, aws-target, CLI and deploy tests (re-exported by conftest.py).

- `offline_builds`: the pipeline built offline once per test session and target (the SDK import
  and build take seconds, so every test reads the same build).
- `moto_server`: a real moto server process on 127.0.0.1, standing in for AWS; `aws_env` points
  boto3 (in this process and in child processes) at it, with a fresh, empty account per test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/kennel-execution"
BUCKET = "kennel-test-bucket"


def repo_config(**overrides: str):
    """kennel.toml of the repository, unaffected by the developer's environment."""
    from pipeline.config import load_config

    environ = {f"KENNEL_{name.upper()}": value for name, value in overrides.items()}
    return load_config(REPO_ROOT / "kennel.toml", environ=environ)


class OfflineBuilds:
    """Offline builds by target, each made on first use."""

    def __init__(self) -> None:
        self._builds: dict[str, object] = {}

    def __getitem__(self, target: str):
        if target not in self._builds:
            from pipeline.definition import build_offline

            self._builds[target] = build_offline(repo_config(), target)
        return self._builds[target]


@pytest.fixture(scope="session")
def offline_builds() -> OfflineBuilds:
    return OfflineBuilds()


@dataclass
class MotoServer:
    url: str

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    port = _free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = MotoServer(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.reset()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


def aws_environment(server: MotoServer) -> dict[str, str]:
    """Variables that send every AWS call of a process to the moto server."""
    return {
        "AWS_ENDPOINT_URL": server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_MAX_ATTEMPTS": "1",  # moto answers 500 for what it lacks; do not retry it
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "SAGEMAKER_VALIDATE_ROLE": "false",  # moto lacks iam:SimulatePrincipalPolicy
    }


@pytest.fixture
def aws_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """This process talks to a fresh moto account; KENNEL_* settings of the developer are ignored."""
    moto_server.reset()
    for name in list(os.environ):
        if name.startswith("KENNEL_") or name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name)
    for name, value in aws_environment(moto_server).items():
        monkeypatch.setenv(name, value)
    return moto_server
