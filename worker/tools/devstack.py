"""Local parts for the demo, the local stack (``cancel-worker dev``) and the tests: the Kafka
broker script (a single node, or a cluster of them), simulator and worker processes.
Everything binds to loopback (on free ports, unless a port is given).
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"
# The Kafka releases the project runs its broker tests on (``kafka.sh versions`` and the
# Makefile's setup say the same); the first is the default broker.
KAFKA_VERSIONS = ("3.9.1", "4.4.0")
DEFAULT_KAFKA_VERSION = KAFKA_VERSIONS[0]


def write_private_key(path: Path, kind: str) -> None:
    """A fresh Ed25519 or RSA-2048 key as PKCS#8 PEM, readable by its owner only."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if kind == "ed25519"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Broker:
    """A KRaft node started by ``kafka.sh``: a single-node cluster, or one node of a
    :class:`Cluster` (``node_id``, ``voters`` and ``cluster_id`` then say which)."""

    data_dir: Path
    port: int
    controller_port: int
    extra_config: Path | None = None
    version: str = DEFAULT_KAFKA_VERSION
    node_id: int = 1
    voters: str = ""
    cluster_id: str = ""
    heap: str = ""

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker's JVM, if it runs."""
        try:
            pid = int((self.data_dir / "broker.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    @property
    def log(self) -> Path:
        return self.data_dir / "logs" / "broker.log"

    def restart(self, timeout_s: int = 180) -> None:
        """Start this broker again after :meth:`stop` or :meth:`kill` (same ports, same data)."""
        _run_start(self, timeout_s, ())

    def stop(self) -> None:
        subprocess.run(  # noqa: S603 - the project's own script
            [str(KAFKA_SCRIPT), "stop", "--data-dir", str(self.data_dir)],
            check=False,
            capture_output=True,
        )

    def kill(self, timeout_s: float = 30.0) -> None:
        """SIGKILL the broker's JVM (no shutdown at all) and wait until it is gone."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.pid is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka node {self.node_id} (pid {pid}) outlived SIGKILL")
            time.sleep(0.05)


def _run_start(broker: Broker, timeout_s: int, format_args: Sequence[str]) -> None:
    extra = [] if broker.extra_config is None else ["--extra-config", str(broker.extra_config)]
    extra += [item for arg in format_args for item in ("--format-arg", arg)]
    if broker.voters:
        extra += ["--node-id", str(broker.node_id), "--voters", broker.voters]
    if broker.cluster_id:
        extra += ["--cluster-id", broker.cluster_id]
    result = subprocess.run(  # noqa: S603 - the project's own script
        [
            str(KAFKA_SCRIPT),
            "start",
            "--version",
            broker.version,
            "--port",
            str(broker.port),
            "--controller-port",
            str(broker.controller_port),
            "--data-dir",
            str(broker.data_dir),
            "--timeout",
            str(timeout_s),
            *extra,
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "KAFKA_HEAP": broker.heap} if broker.heap else None,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"Kafka {broker.version} broker (node {broker.node_id}) failed to start:\n"
            f"{result.stderr[-4000:]}"
        )


def start_broker(
    data_dir: Path,
    timeout_s: int = 180,
    *,
    port: int = 0,
    controller_port: int = 0,
    extra_config: Path | None = None,
    format_args: Sequence[str] = (),
    version: str = DEFAULT_KAFKA_VERSION,
) -> Broker:
    """Start a single-node KRaft broker with the project's script; returns once ready.

    Given the ports of a stopped broker and its data dir, this starts that broker again
    (same cluster, same topics and offsets). ``extra_config``: properties appended to the
    script's (more listeners, say); ``format_args``: for the storage format on first start;
    ``version``: the Kafka release (one of :data:`KAFKA_VERSIONS`).
    """
    broker = Broker(
        data_dir, port or free_port(), controller_port or free_port(), extra_config, version
    )
    _run_start(broker, timeout_s, format_args)
    return broker


# A cluster that survives the loss of any one node without losing a committed write:
# every topic (the internal ones too) on all three nodes, a write acknowledged by two.
# A node that stops heartbeating is fenced (and leaves the ISRs) after 3 s, not 9.
CLUSTER_CONFIG = """\
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
unclean.leader.election.enable=false
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
"""


@dataclass
class Cluster:
    """A KRaft cluster of nodes that are each broker and controller (``kafka.sh`` nodes)."""

    nodes: list[Broker] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def stop(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(Broker.stop, self.nodes))


def start_cluster(
    data_dir: Path,
    nodes: int = 3,
    timeout_s: int = 180,
    *,
    version: str = DEFAULT_KAFKA_VERSION,
    heap: str = "384m",
) -> Cluster:
    """Start ``nodes`` combined broker+controller nodes (all voters of one quorum) with
    :data:`CLUSTER_CONFIG`, side by side (a node starts once a quorum of controllers has);
    returns once every node has started. A node is restarted with its :meth:`Broker.restart`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    extra = data_dir / "cluster.properties"
    extra.write_text(CLUSTER_CONFIG)
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    voters = ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports))
    cluster_id = _kraft_id()
    cluster = Cluster(
        [
            Broker(
                data_dir / f"node-{i + 1}",
                port,
                cport,
                extra,
                version,
                node_id=i + 1,
                voters=voters,
                cluster_id=cluster_id,
                heap=heap,
            )
            for i, (port, cport) in enumerate(ports)
        ]
    )
    with ThreadPoolExecutor(nodes) as pool:
        started = [pool.submit(_run_start, node, timeout_s, ()) for node in cluster.nodes]
        errors = [f.exception() for f in started]
    if any(errors):
        cluster.stop()
        raise RuntimeError("\n".join(str(e) for e in errors if e is not None))
    return cluster


def _kraft_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class Process:
    """A child process whose output is collected in the background (and echoed if asked)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        echo: IO[str] | None = None,
    ) -> None:
        self.name = name
        self.lines: list[str] = []
        self._echo = echo
        self.proc = subprocess.Popen(  # noqa: S603 - our own entry points
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=str(REPO),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        if self.proc.stdout is None:
            return
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if self._echo is not None:
                self._echo.write(f"[{self.name}] {line}")

    def wait_for_line(self, text: str, timeout_s: float, *, at_start: bool = False) -> str:
        """The first output line containing ``text`` (or starting with it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(text) if at_start else text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.lines[-40:])
        raise RuntimeError(f"{self.name} did not print {text!r} in time; output:\n{tail}")

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker", *args]


def start_sim(
    accounts_file: Path, *extra: str, echo: IO[str] | None = None, port: int = 0
) -> tuple[Process, str]:
    """The simulator on ``port`` (0: a free one); returns it and its base URL."""
    proc = Process(
        "sim",
        cli_argv("sim", "--port", str(port), "--accounts", str(accounts_file), *extra),
        echo=echo,
    )
    line = proc.wait_for_line("SIM_READY ", 30, at_start=True)
    return proc, line.split(" ", 1)[1].strip()


def start_worker(env: Mapping[str, str], echo: IO[str] | None = None) -> Process:
    return Process("worker", cli_argv("run"), env=env, echo=echo)
