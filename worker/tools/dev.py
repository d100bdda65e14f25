"""``cancel-worker dev`` (``make dev``): a local stack to use by hand, on the worker's defaults.

Starts a single-node Kafka broker on 127.0.0.1:9092 (the worker's default
``BOOTSTRAP_SERVERS``), the PAPI simulator on 127.0.0.1:8765 with the accounts and orders of
``deploy/dev/`` (``accounts.toml``, ``seed-orders.json``), creates the worker's three topics
under their default names, and runs the worker (``cancel-worker run``) against them with
``PAPI_URL`` and ``TIME_URL`` pointing at the simulator and ``PRODUCERS_FILE`` at
``deploy/dev/producers.toml``, whose one producer, ``dev``, signs with the fake key
``deploy/dev/dev.key``. ``cancel-worker send`` (with ``--producer-id dev
--producer-key-file deploy/dev/dev.key``), ``cancel-worker results`` and the client library
then work with no setting at all. Ctrl-C (or
SIGTERM) stops the worker, the simulator and the broker; every start is a fresh stack (the
broker's data lives in ``.local/dev`` and is removed at the next start).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from worker.kafka.io import ensure_topics
from worker.settings import ENV_PREFIX, Settings
from worker.tools.devstack import REPO, Broker, Process, start_broker, start_sim, start_worker

DEV_DIR = REPO / ".local" / "dev"
ACCOUNTS_FILE = REPO / "deploy" / "dev" / "accounts.toml"
PRODUCERS_FILE = REPO / "deploy" / "dev" / "producers.toml"
PRODUCER_ID = "dev"
PRODUCER_KEY_FILE = REPO / "deploy" / "dev" / "dev.key"  # fake: the local stack's only
SEED_FILE = REPO / "deploy" / "dev" / "seed-orders.json"
KAFKA_PORT = 9092
CONTROLLER_PORT = 9093
SIM_PORT = 8765
READY = "local stack ready"


def _busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def worker_env(bootstrap: str, sim_url: str) -> dict[str, str]:
    """The worker's settings: its defaults, but the exchange is the local simulator."""
    env = {
        f"{ENV_PREFIX}PAPI_URL": sim_url,
        f"{ENV_PREFIX}TIME_URL": f"{sim_url}/fapi/v1/time",
        f"{ENV_PREFIX}ACCOUNTS_FILE": str(ACCOUNTS_FILE),
        f"{ENV_PREFIX}PRODUCERS_FILE": str(PRODUCERS_FILE),
    }
    if bootstrap != Settings.bootstrap_servers:
        env[f"{ENV_PREFIX}BOOTSTRAP_SERVERS"] = bootstrap
    return env


def banner(broker: Broker, sim_url: str) -> str:
    default = broker.bootstrap == Settings.bootstrap_servers
    prefix = "" if default else f"{ENV_PREFIX}BOOTSTRAP_SERVERS={broker.bootstrap} "
    signing = (
        f"--producer-id {PRODUCER_ID} --producer-key-file {PRODUCER_KEY_FILE.relative_to(REPO)}"
    )
    return "\n".join(
        [
            f"{READY}: Kafka {broker.bootstrap}, simulator {sim_url}, worker running "
            f"(topics {Settings.commands_topic}, {Settings.results_topic}, "
            f"{Settings.deadletter_topic}).",
            f"Open orders: {SEED_FILE.relative_to(REPO)} (accounts "
            f"{ACCOUNTS_FILE.relative_to(REPO)}). Try, in another shell:",
            f"  {prefix}.venv/bin/cancel-worker send {signing} --account desk-a --market UM "
            "--symbol BTCUSDT --client-algo-id desk-a-algo-stop --wait",
            f"  {prefix}.venv/bin/cancel-worker send {signing} --account desk-b --market UM "
            "--symbol DOGEUSDT --all --wait",
            f"  {prefix}.venv/bin/cancel-worker results --follow",
            f"  curl -s {sim_url}/_sim/orders",
            "Ctrl-C stops the worker, the simulator and the broker.",
        ]
    )


def run_dev(
    *,
    kafka_port: int = KAFKA_PORT,
    controller_port: int = CONTROLLER_PORT,
    sim_port: int = SIM_PORT,
    data_dir: Path = DEV_DIR,
    partitions: int = 3,
    quiet: bool = False,
) -> int:
    """Run the stack until Ctrl-C or SIGTERM (exit 0) or until a part of it dies (exit 1).
    Ports already in use: exit 2, nothing started."""
    taken = [p for p in (kafka_port, controller_port, sim_port) if p and _busy(p)]
    if taken:
        print(
            f"cancel-worker dev: port(s) {', '.join(map(str, taken))} already in use on "
            "127.0.0.1 (another broker or stack running?); stop it or choose other ports "
            "(--kafka-port, --controller-port, --sim-port)",
            file=sys.stderr,
        )
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    # Ctrl-C stops the stack even where the shell started this with SIGINT ignored (`&`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    echo = None if quiet else sys.stderr
    shutil.rmtree(data_dir, ignore_errors=True)
    procs: list[Process] = []
    broker = Broker(data_dir / "kafka", kafka_port, controller_port)  # stop() needs the dir
    try:
        print(f"starting Kafka on 127.0.0.1:{kafka_port} ...", flush=True)
        broker = start_broker(data_dir / "kafka", port=kafka_port, controller_port=controller_port)
        print(f"starting the simulator, seeded from {SEED_FILE.relative_to(REPO)} ...", flush=True)
        sim, sim_url = start_sim(ACCOUNTS_FILE, "--seed", str(SEED_FILE), echo=echo, port=sim_port)
        procs.append(sim)
        asyncio.run(
            ensure_topics(
                broker.bootstrap,
                {
                    Settings.commands_topic: partitions,
                    Settings.results_topic: partitions,
                    Settings.deadletter_topic: 1,
                },
            )
        )
        print("starting the worker ...", flush=True)
        worker = start_worker(worker_env(broker.bootstrap, sim_url), echo=echo)
        procs.insert(0, worker)
        worker.wait_for_line("partitions assigned", 90)
        print(banner(broker, sim_url), flush=True)
        while True:
            for proc in procs:
                if proc.proc.poll() is not None:
                    print(
                        f"cancel-worker dev: the {proc.name} exited "
                        f"(code {proc.proc.returncode}); stopping the stack",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping the worker, the simulator and Kafka ...", flush=True)
        return 0
    except RuntimeError as exc:  # a part that did not start
        print(f"cancel-worker dev: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the stop is not interrupted
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc in procs:
            proc.stop()
        broker.stop()
        print("stopped", flush=True)
