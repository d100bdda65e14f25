"""A Kafka broker with a SASL_SSL listener, for the TLS/SASL tests: the project's pinned
broker jars (``deploy/kafka/target/libs``, as ``deploy/kafka/kafka.sh fetch`` leaves them)
started with a configuration of its own, on loopback.

The SASL_SSL listener requires a client certificate signed by the test CA (mutual TLS) and a
SASL login: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, one user for all three. It is advertised
as ``localhost``, the name in the broker's certificate, so the clients verify the host name.
The controller and the broker talk over a PLAINTEXT listener of their own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.tls_material import TlsFiles
from worker.tools.devstack import REPO, free_port

LIBS = REPO / "deploy" / "kafka" / "target" / "libs"
USER = "cancel-worker"
PASSWORD = "sasl-password-of-the-test-broker"


@dataclass(frozen=True)
class SecureBroker:
    port: int  # SASL_SSL, advertised as localhost
    tls: TlsFiles
    user: str
    password: str

    @property
    def bootstrap(self) -> str:
        return f"localhost:{self.port}"


def _java(*args: str, log4j: Path) -> list[str]:
    return [
        "java",
        "-Xms64m",
        "-Xmx384m",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{log4j}",
        "-cp",
        f"{LIBS}/*",
        *args,
    ]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def secure_broker(data: Path, tls: TlsFiles, timeout_s: float = 120) -> Iterator[SecureBroker]:
    """Start the broker in ``data``; stop it (SIGTERM, then SIGKILL) when done."""
    if not (LIBS / ".complete").exists():
        raise RuntimeError(f"no broker jars in {LIBS}: run deploy/kafka/kafka.sh fetch")
    data.mkdir(parents=True, exist_ok=True)
    port, plain, controller = free_port(), free_port(), free_port()
    keystore = data / "broker-keystore.pem"  # PEM keystore: the key, then the certificate
    keystore.write_bytes(tls.server_key.read_bytes() + tls.server_cert.read_bytes())

    def jaas(module: str, users: str = "") -> str:
        return (
            f"org.apache.kafka.common.security.{module} required "
            f'username="{USER}" password="{PASSWORD}"{users};'
        )

    properties = data / "server.properties"
    properties.write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller}",
                f"listeners=SASL_SSL://localhost:{port},PLAINTEXT://127.0.0.1:{plain},"
                f"CONTROLLER://127.0.0.1:{controller}",
                f"advertised.listeners=SASL_SSL://localhost:{port},PLAINTEXT://127.0.0.1:{plain}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,"
                "SASL_SSL:SASL_SSL",
                "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
                "listener.name.sasl_ssl.plain.sasl.jaas.config="
                + jaas("plain.PlainLoginModule", f' user_{USER}="{PASSWORD}"'),
                "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config="
                + jaas("scram.ScramLoginModule"),
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                + jaas("scram.ScramLoginModule"),
                "ssl.keystore.type=PEM",
                f"ssl.keystore.location={keystore}",
                "ssl.truststore.type=PEM",
                f"ssl.truststore.location={tls.ca}",
                # SASL_SSL listeners ignore a client-auth setting without their prefix.
                "listener.name.sasl_ssl.ssl.client.auth=required",
                f"log.dirs={data / 'kraft'}",
                "num.partitions=1",
                "auto.create.topics.enable=false",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=2",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=2",
                "group.initial.rebalance.delay.ms=0",
                "group.min.session.timeout.ms=1000",
                "num.network.threads=2",
                "num.io.threads=2",
                "",
            ]
        )
    )
    log4j = data / "log4j.properties"
    log4j.write_text(
        "log4j.rootLogger=WARN, file\n"
        "log4j.logger.kafka.server.BrokerServer=INFO\n"
        "log4j.appender.file=org.apache.log4j.FileAppender\n"
        f"log4j.appender.file.File={data / 'broker.log'}\n"
        "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
        "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
    )
    cluster = subprocess.run(
        _java("kafka.tools.StorageTool", "random-uuid", log4j=log4j),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    scram = [
        arg
        for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
        for arg in ("--add-scram", f"{mechanism}=[name={USER},password={PASSWORD}]")
    ]
    subprocess.run(
        _java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster,
            "-c",
            str(properties),
            *scram,
            log4j=log4j,
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    out = (data / "stdout.log").open("w")
    proc = subprocess.Popen(
        _java("kafka.Kafka", str(properties), log4j=log4j),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        log = data / "broker.log"
        while not (
            _port_open(port) and log.exists() and "to STARTED" in log.read_text("utf-8", "replace")
        ):
            if proc.poll() is not None:
                raise RuntimeError(
                    "secure broker exited:\n" + (data / "stdout.log").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"secure broker not ready after {timeout_s:g}s")
            time.sleep(0.1)
        yield SecureBroker(port, tls, USER, PASSWORD)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()
