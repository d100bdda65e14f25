"""Session-wide real parts: one Kafka broker per Kafka release and one PAPI simulator process
per test session.

Most tests run on the default release's broker (:data:`DEFAULT_KAFKA_VERSION`, with the
TLS/SASL listener). The modules of :data:`KAFKA_MATRIX_MODULES` (exactly-once delivery,
fencing, staging, the race between transactions, the pipeline) run every test that takes
``broker`` once per release of :data:`KAFKA_VERSIONS` (ids ``[kafka-<version>]``); each
other release's broker is started when a test first needs it and serves the rest of the
session."""

from __future__ import annotations

import functools
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.secure_broker import FORMAT_ARGS, PASSWORD, USER, SecureBroker, secure_listener
from tests.support import SimControl, result_schema_error, write_accounts
from worker.core import events
from worker.exchange.accounts import Credentials, load_accounts
from worker.tools.devstack import (
    DEFAULT_KAFKA_VERSION,
    KAFKA_VERSIONS,
    Broker,
    Process,
    free_port,
    start_broker,
    start_sim,
)

# The test modules whose broker tests run on every release of KAFKA_VERSIONS.
KAFKA_MATRIX_MODULES = frozenset(
    {
        "test_delivery",
        "test_fencing",
        "test_staging",
        "test_txn_backoff",
        "test_pipeline_integration",
        "test_kafka_versions",
    }
)


# ... but for these, the slowest of them (40 s and 30 s), whose faults are the worker's own
# (five SIGKILLs) or a stopped broker process, not a protocol difference between releases:
# on the default release only, to keep the suite within its time.
DEFAULT_RELEASE_ONLY = frozenset(
    {
        "test_sigkill_at_five_random_moments_gives_exactly_one_result_each",
        "test_broker_stopped_for_20s_the_same_process_finishes_the_run",
    }
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if metafunc.function.__name__ in DEFAULT_RELEASE_ONLY:
        return
    if "broker" in metafunc.fixturenames and module in KAFKA_MATRIX_MODULES:
        metafunc.parametrize(
            "broker", KAFKA_VERSIONS, indirect=True, ids=[f"kafka-{v}" for v in KAFKA_VERSIONS]
        )


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


EVENT_BUILDERS = ("canceled", "strategies_canceled", "failed", "duplicate")


class ResultEventCheck:
    """What the schema check of the events built during one test found."""

    def __init__(self) -> None:
        self.checked = 0
        self.violations: list[str] = []

    def check(self, event: object, where: str) -> None:
        self.checked += 1
        problem = result_schema_error(event)
        if problem is not None:
            message = f"{where}: the event violates the result schema: {problem}"
            self.violations.append(f"{message}: {event!r}")
            raise AssertionError(message)


@pytest.fixture(autouse=True)
def result_events() -> Iterator[ResultEventCheck]:
    """Every result event built in this process during a test is checked against
    ``schemas/result-event.schema.json``: each builder of :mod:`worker.core.events` as it returns,
    and :func:`worker.core.events.serialize` (the one place results become bytes) as it is
    called. An invalid event raises where it is built and fails the test at teardown too,
    even if the code that built it swallowed the error. (Results written by worker
    processes are checked where the tests read them: see tests/support.py.)"""
    check = ResultEventCheck()
    originals: dict[str, Callable[..., Any]] = {}

    def checked_builder(name: str, build: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
        @functools.wraps(build)
        def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
            event = build(*args, **kwargs)
            check.check(event, f"worker.core.events.{name}")
            return event

        return wrapper

    serialize = events.serialize

    def checked_serialize(event: dict[str, Any]) -> bytes:
        check.check(event, "worker.core.events.serialize")
        return serialize(event)

    for name in EVENT_BUILDERS:
        originals[name] = getattr(events, name)
        setattr(events, name, checked_builder(name, originals[name]))
    originals["serialize"] = serialize
    events.serialize = checked_serialize
    try:
        yield check
    finally:
        for name, original in originals.items():
            setattr(events, name, original)
    if check.violations:
        pytest.fail("\n".join(check.violations), pytrace=False)


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
def _session_broker(session_dir: Path) -> Iterator[tuple[Broker, SecureBroker]]:
    """The session's one broker: a PLAINTEXT listener for most tests, and a SASL_SSL
    listener with mutual TLS for the TLS/SASL tests (tests/secure_broker.py)."""
    port, secure_port, controller_port = free_port(), free_port(), free_port()
    properties, tls = secure_listener(
        session_dir / "kafka-secure",
        port=port,
        secure_port=secure_port,
        controller_port=controller_port,
    )
    b = start_broker(
        session_dir / "kafka",
        port=port,
        controller_port=controller_port,
        extra_config=properties,
        format_args=FORMAT_ARGS,
    )
    try:
        yield b, SecureBroker(secure_port, tls, USER, PASSWORD)
    finally:
        b.stop()


@pytest.fixture(scope="session")
def _other_brokers(session_dir: Path) -> Iterator[dict[str, Broker]]:
    """The session's brokers of the other releases (PLAINTEXT only), started on first use."""
    started: dict[str, Broker] = {}
    try:
        yield started
    finally:
        for b in started.values():
            b.stop()


@pytest.fixture
def broker(
    request: pytest.FixtureRequest, session_dir: Path, _other_brokers: dict[str, Broker]
) -> Broker:
    """The session's broker of the test's Kafka release (parametrized in the modules of
    KAFKA_MATRIX_MODULES), else of the default one."""
    version: str = getattr(request, "param", DEFAULT_KAFKA_VERSION)
    if version == DEFAULT_KAFKA_VERSION:
        default: tuple[Broker, SecureBroker] = request.getfixturevalue("_session_broker")
        return default[0]
    if version not in _other_brokers:
        _other_brokers[version] = start_broker(session_dir / f"kafka-{version}", version=version)
    return _other_brokers[version]


@pytest.fixture(scope="session")
def secured(_session_broker: tuple[Broker, SecureBroker]) -> SecureBroker:
    """The session broker's SASL_SSL listener (advertised as localhost)."""
    return _session_broker[1]


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
