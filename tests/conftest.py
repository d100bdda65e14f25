"""Session-wide real parts: one Kafka broker and one PAPI simulator process per test session."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.support import SimControl, write_accounts
from worker.accounts import Credentials, load_accounts
from worker.tools.devstack import Broker, Process, start_broker, start_sim

# CI runs the same examples every time (a red run must be reproducible); locally,
# hypothesis explores new ones on every run.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """Collect garbage as each test ends, so an unclosed socket, transport or Kafka
    connection is reported (and fails) in the test that leaked it, not in whichever
    later test the collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cancel-worker-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def accounts_file(session_dir: Path) -> Path:
    return write_accounts(session_dir / "secrets")


@pytest.fixture(scope="session")
def accounts(accounts_file: Path) -> dict[str, Credentials]:
    """The accounts of ``accounts_file``, loaded: for simulators run in the test's loop."""
    return load_accounts(accounts_file)


@pytest.fixture(scope="session")
def broker(session_dir: Path) -> Iterator[Broker]:
    b = start_broker(session_dir / "kafka")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def sim_process(accounts_file: Path) -> Iterator[tuple[Process, str]]:
    proc, url = start_sim(accounts_file)
    try:
        yield proc, url
    finally:
        proc.stop()


@pytest.fixture
def sim(sim_process: tuple[Process, str]) -> Iterator[SimControl]:
    control = SimControl(sim_process[1])
    try:
        yield control
    finally:
        control.reset()
        control.close()
