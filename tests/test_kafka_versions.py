"""The Kafka releases the broker tests run on are the ones that run.

tests/conftest.py runs the exactly-once modules' broker tests once per release of
``KAFKA_VERSIONS``; this module is in that matrix too, and checks for each release that the
broker serving those tests is that release: its JVM runs that release's jars, it says so in
its log, and it answers ApiVersions as that release line does (Kafka 4 dropped Fetch v0-v3
and offers EndTxn v5, the transactions v2 protocol of KIP-890, with ``transaction.version``
2 finalized; 3.9 offers neither).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from aiokafka.client import AIOKafkaClient

from worker.kafka.fencing import exactly_once_refusal
from worker.tools.devstack import (
    DEFAULT_KAFKA_VERSION,
    KAFKA_SCRIPT,
    KAFKA_VERSIONS,
    REPO,
    Broker,
)

pytestmark = pytest.mark.integration

FETCH, END_TXN = 1, 26


def classpath(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"-cp") + 1].decode()


async def api_versions(bootstrap: str) -> tuple[dict[int, tuple[int, int]], str | None]:
    """The broker's ApiVersions answer (key → (min, max)) and the exactly-once check's
    verdict on it."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        node = next(iter(client.cluster.brokers())).nodeId
        conn = await client._get_conn(node)
        assert conn is not None
        return dict(conn._versions), exactly_once_refusal(client)
    finally:
        await client.close()


async def test_the_broker_is_the_release_it_is_configured_as(broker: Broker) -> None:
    version = broker.version
    major, minor = version.split(".")[:2]
    # Its JVM runs that release's jars, and only that release's.
    pid = broker.pid
    assert pid is not None
    libs = REPO / "deploy" / "kafka" / "target" / version / "libs"
    assert classpath(pid) == f"{libs}/*"
    assert sorted(p.name for p in libs.glob("kafka_2.13-*.jar")) == [f"kafka_2.13-{version}.jar"]
    assert sorted(p.name for p in libs.glob("kafka-clients-*.jar")) == [
        f"kafka-clients-{version}.jar"
    ]
    # It says so: the metadata version of its release line (and 3.x names its version).
    log = broker.log.read_text()
    assert re.search(rf"setting metadata\.version to {major}\.{minor}-IV\d+", log), log[-3000:]
    if int(major) < 4:
        assert f"Kafka version: {version}" in log
    # It answers as its release line does; exactly-once's requests are there on both.
    versions, refusal = await api_versions(broker.bootstrap)
    assert refusal is None
    if int(major) >= 4:
        assert versions[FETCH][0] >= 4, versions[FETCH]  # KIP-896 removed Fetch v0-v3
        assert versions[END_TXN][1] >= 5, versions[END_TXN]  # transactions v2 offered
        assert "setting feature transaction.version to 2" in log
    else:
        assert versions[FETCH][0] == 0, versions[FETCH]
        assert versions[END_TXN][1] < 5, versions[END_TXN]
        assert "transaction.version to 2" not in log


def test_setup_fetches_the_releases_the_tests_run_on() -> None:
    script = subprocess.run(
        [str(KAFKA_SCRIPT), "versions"], check=True, capture_output=True, text=True
    )
    assert tuple(script.stdout.split()) == KAFKA_VERSIONS
    assert KAFKA_VERSIONS[0] == DEFAULT_KAFKA_VERSION
    makefile = (REPO / "Makefile").read_text()
    listed = re.search(r"^KAFKA_VERSIONS := (.+)$", makefile, re.MULTILINE)
    assert listed is not None
    assert tuple(listed.group(1).split()) == KAFKA_VERSIONS
    assert len(KAFKA_VERSIONS) >= 2 and KAFKA_VERSIONS[1].split(".")[0] == "4"
