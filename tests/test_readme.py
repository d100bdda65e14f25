"""The README's code runs as written: its Python block, the client library page's
(docs/client.md) and the README's "Run it by hand" commands, against the local stack that
``cancel-worker dev`` (``make dev``) starts, on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import _check_results, events_of, read_to_end, run_cli
from worker.settings import ENV_PREFIX, Settings
from worker.tools.dev import READY
from worker.tools.devstack import REPO, Process, cli_argv, free_port

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()
CLIENT_PAGE = (REPO / "docs" / "client.md").read_text()
DEFAULT_BOOTSTRAP = Settings.bootstrap_servers


def python_blocks(text: str = README) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def by_hand_commands() -> list[list[str]]:
    """The ``cancel-worker`` command lines of "Run it by hand", as argument lists."""
    section = README.split("### Run it by hand", 1)[1].split("\n## ", 1)[0]
    prefix = "    .venv/bin/cancel-worker "
    return [line[len(prefix) :].split() for line in section.splitlines() if line.startswith(prefix)]


def test_the_readme_opens_with_the_two_commands_and_shows_the_stack_by_hand() -> None:
    head = README.split("\n\n")[:3]
    assert head[0] == "# cancel-worker"
    assert [line.split("#")[0].strip() for line in head[2].splitlines()] == [
        "make demo",
        "make test",
    ]
    assert "    make dev " in README.split("### Run it by hand", 1)[1][:200]
    assert python_blocks(), "the README has no Python block to run"
    assert python_blocks(CLIENT_PAGE), "docs/client.md has no Python block to run"
    for block in python_blocks() + python_blocks(CLIENT_PAGE):
        assert DEFAULT_BOOTSTRAP in block  # the worker's default: what `make dev` listens on


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str]]:
    """``cancel-worker dev`` on free ports (the README's 9092 may be taken on this machine)."""
    data: Path = tmp_path_factory.mktemp("dev")
    kafka = free_port()
    dev = Process(
        "dev",
        cli_argv(
            "dev",
            *("--kafka-port", str(kafka), "--controller-port", str(free_port())),
            *("--sim-port", "0", "--data-dir", str(data), "--quiet"),
        ),
    )
    try:
        dev.wait_for_line(READY, 240)
        yield dev, f"127.0.0.1:{kafka}"
    finally:
        if dev.proc.poll() is None:
            dev.signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                dev.proc.wait(90)
        dev.stop()  # SIGTERM, then SIGKILL, if Ctrl-C did not stop it; closes its output


def run_block(block: str, bootstrap: str) -> subprocess.CompletedProcess[str]:
    """A README block, unchanged but for the bootstrap address, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", block.replace(DEFAULT_BOOTSTRAP, bootstrap)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_readme_runs_as_pasted_against_make_dev(stack: tuple[Process, str]) -> None:
    dev, bootstrap = stack
    # The README's short example: one conditional cancel no other block touches.
    (short,) = python_blocks()
    done = await asyncio.to_thread(run_block, short, bootstrap)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["strategy.canceled"]

    # The client library page's example.
    (block,) = python_blocks(CLIENT_PAGE)
    done = await asyncio.to_thread(run_block, block, bootstrap)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "canceled desk-a-algo-stop CANCELED",
        "canceled desk-a-cm-stop CANCELED qty 2",
        "2 canceled; complete: True",
    ]
    # Run again, as the README says: the orders are gone.
    done = await asyncio.to_thread(run_block, block, bootstrap)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["failed", "already_closed"]] * 2, lines
    assert lines[2] == "0 canceled; complete: True"

    # "Run it by hand": the same stack with no setting but where Kafka listens.
    env = {f"{ENV_PREFIX}BOOTSTRAP_SERVERS": bootstrap}
    commands = by_hand_commands()
    assert [c[0] for c in commands] == ["send", "send", "results"]
    algo, kill, _follow = commands
    done = await asyncio.to_thread(run_cli, *algo, env=env)
    assert done.returncode == 1 and " FAILED already_closed" in done.stdout  # canceled above
    done = await asyncio.to_thread(run_cli, *kill, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "desk-b UM DOGEUSDT: kill switch complete: canceled 2," in done.stdout
    done = await asyncio.to_thread(run_cli, "results", env=env)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 9

    records = await read_to_end(bootstrap, Settings.results_topic)
    _check_results(records)  # every event the worker wrote is valid against its schema
    assert len(events_of(records)) == 9

    # Ctrl-C stops the whole stack.
    dev.signal(signal.SIGINT)
    assert await asyncio.to_thread(dev.proc.wait, 90) == 0, dev.output()
    dev.stop()
    assert dev.lines[-1] == "stopped"
    done = await asyncio.to_thread(run_cli, "results", env=env)
    assert done.returncode == 1 and "cannot reach Kafka" in done.stderr
