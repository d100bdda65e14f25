"""Local parts for the demo, the local stack (``cancel-worker dev``) and the tests: the Kafka
broker script, simulator and worker processes. Everything binds to loopback (on free ports,
unless a port is given).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

REPO = Path(__file__).resolve().parents[2]
KAFKA_SCRIPT = REPO / "deploy" / "kafka" / "kafka.sh"


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
    data_dir: Path
    port: int
    controller_port: int
    extra_config: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self, timeout_s: int = 180) -> None:
        """Start this broker again after :meth:`stop` (same ports, same data)."""
        start_broker(
            self.data_dir,
            timeout_s,
            port=self.port,
            controller_port=self.controller_port,
            extra_config=self.extra_config,
        )

    def stop(self) -> None:
        subprocess.run(  # noqa: S603 - the project's own script
            [str(KAFKA_SCRIPT), "stop", "--data-dir", str(self.data_dir)],
            check=False,
            capture_output=True,
        )


def start_broker(
    data_dir: Path,
    timeout_s: int = 180,
    *,
    port: int = 0,
    controller_port: int = 0,
    extra_config: Path | None = None,
    format_args: Sequence[str] = (),
) -> Broker:
    """Start a single-node KRaft broker with the project's script; returns once ready.

    Given the ports of a stopped broker and its data dir, this starts that broker again
    (same cluster, same topics and offsets). ``extra_config``: properties appended to the
    script's (more listeners, say); ``format_args``: for the storage format on first start.
    """
    broker = Broker(data_dir, port or free_port(), controller_port or free_port(), extra_config)
    extra = [] if extra_config is None else ["--extra-config", str(extra_config)]
    extra += [item for arg in format_args for item in ("--format-arg", arg)]
    result = subprocess.run(  # noqa: S603 - the project's own script
        [
            str(KAFKA_SCRIPT),
            "start",
            "--port",
            str(broker.port),
            "--controller-port",
            str(broker.controller_port),
            "--data-dir",
            str(data_dir),
            "--timeout",
            str(timeout_s),
            *extra,
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"Kafka broker failed to start:\n{result.stderr[-4000:]}")
    return broker


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
