"""The bench's request-path marks (tests.bench.stages): read back into per-stage times."""

from __future__ import annotations

import itertools
from pathlib import Path

import orjson

from tests.bench import stages


def one_command(start_ns: int, step_ns: int, cpu_step_ns: int) -> list[list[object]]:
    """The marks of one record's path: every stage ``step_ns`` after the one before."""
    return [
        [stage, start_ns + i * step_ns, start_ns + i * cpu_step_ns, 1 if stage == "handed" else 0]
        for i, stage in enumerate(stages.STAGES)
    ]


def test_the_time_between_marks_is_read_per_stage_and_from_fetch_to_write(
    tmp_path: Path,
) -> None:
    marks = one_command(0, 10_000, 10_000) + one_command(10**9, 30_000, 20_000)
    # A fetch that handed over two records, and a path cut short: neither is counted.
    marks += [["fetched", 2 * 10**9, 0, 0], ["handed", 2 * 10**9 + 5_000, 0, 2]]
    marks += one_command(3 * 10**9, 10_000, 10_000)[:4]
    path = tmp_path / "paced100.worker.abc.json"
    path.write_bytes(orjson.dumps(marks))

    figures = stages.summarize([path])

    assert list(figures) == [
        *(f"{a} → {b}" for a, b in itertools.pairwise(stages.STAGES)),
        "fetched → written",
    ]
    step = figures["signing → sending"]
    assert step["commands"] == 2
    assert step["wall_us"] == {"p50": 10, "p90": 30, "p99": 30}
    assert step["cpu_us"] == {"p50": 10, "p90": 20, "p99": 20}
    whole = figures["fetched → written"]
    assert whole["wall_us"]["p99"] == 7 * 30 and whole["cpu_us"]["p50"] == 7 * 10
    assert "fetched → written" in stages.render(figures)
