"""The bench's report: the issue's speed targets read from one run's pooled figures."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench.main import Run
from tests.bench.report import render_table, results_json, targets


def system(cmd_s: float, cpu_us: float, request_p99: float | None) -> dict[str, Any]:
    request = None if request_p99 is None else {"p50": 1.0, "p99": request_p99, "max": 20.0}
    return {
        "throughput_cmd_s": cmd_s,
        "cpu_us_per_cmd": cpu_us,
        "request_latency_ms": request,
    }


SCENARIOS = {
    "0ms": {
        "pipeline_floor": system(2400, 120, 700),
        "worker": system(2200, 303, 670),
        "worker_at_least_once": system(1100, 315, 800),
    },
    "20ms": {
        "naive": system(40, 2900, 18000),
        "worker": system(1770, 330, 1170),
        "worker_at_least_once": system(790, 520, 1070),
    },
    "paced100": {
        "kafka_floor": system(100, 1370, 2.9),
        "worker": system(100, 1720, 4.1),
        "worker_at_least_once": system(100, 2010, 5.3),
    },
}


def verdicts(checks: list[dict[str, Any]], name: str) -> dict[str, tuple[Any, Any]]:
    return {c["target"]: (c["value"], c["met"]) for c in checks if c["system"] == name}


def test_each_target_is_read_against_its_limit_for_each_worker() -> None:
    checks = targets(SCENARIOS)

    assert verdicts(checks, "worker") == {
        "cpu_us_per_cmd_0ms": (303, True),
        "cpu_us_per_cmd_20ms": (330, True),
        "share_of_pipeline_floor_0ms": (pytest.approx(2200 / 2400, abs=0.01), True),
        "times_naive_20ms": (pytest.approx(1770 / 40, abs=0.01), True),
        "paced_p99_over_kafka_floor_ms": (pytest.approx(1.2), True),
    }
    assert verdicts(checks, "worker_at_least_once") == {
        "cpu_us_per_cmd_0ms": (315, True),
        "cpu_us_per_cmd_20ms": (520, False),  # over 500 µs
        "share_of_pipeline_floor_0ms": (pytest.approx(1100 / 2400, abs=0.01), False),
        "times_naive_20ms": (pytest.approx(790 / 40, abs=0.01), False),  # 19.75x
        "paced_p99_over_kafka_floor_ms": (pytest.approx(2.4), False),
    }


def test_a_target_whose_figures_did_not_run_is_not_judged() -> None:
    only_paced = {"paced100": {"worker": system(100, 1700, 4.1)}}  # no Kafka floor, no bursts

    checks = targets(only_paced)

    assert {c["system"] for c in checks} == {"worker"}  # at-least-once did not run at all
    assert all(c["met"] is None and c["value"] is None for c in checks)


def run(scenario: str, system_name: str, request_ms: list[float], round_: int = 0) -> Run:
    return Run(
        scenario,
        system_name,
        round_,
        commands=len(request_ms),
        duration_s=1.0,
        cpu_s=0.0003 * len(request_ms),
        peak_rss_mb=60.0,
        latencies_ms=[x + 20 for x in request_ms],
        request_latencies_ms=request_ms,
    )


def test_the_table_ends_with_each_rounds_paced_tail_and_the_targets() -> None:
    # 100 commands a round: the p99 (nearest rank) is the second slowest of each round.
    floor = [1.0] * 98 + [3.0, 3.0]
    rounds = [
        run("paced100", "kafka_floor", floor),
        run("paced100", "kafka_floor", floor, 1),
        run("paced100", "worker", [1.5] * 98 + [5.5, 5.5]),
        run("paced100", "worker", [1.5] * 98 + [6.5, 6.5], 1),
    ]
    report = results_json(
        rounds,
        plan_name="test",
        rounds={"paced100": 2},
        scenarios={"paced100": {"latency_ms": 20, "rate": 100.0}},
        started_at="now",
        wall_s=1.0,
        machine={},
        load_before=(0.0, 0.0, 0.0),
        extra={},
    )

    paced = report["scenarios"]["paced100"]
    assert paced["worker"]["request_p99_by_round_ms"] == [5.5, 6.5]
    # Pooled over both rounds (the third slowest of 200): 5.5 against the floor's 3.0.
    assert verdicts(report["targets"], "worker")["paced_p99_over_kafka_floor_ms"] == (2.5, False)
    text = render_table(report)
    assert "paced request p99 by round (ms): kafka_floor 3.0, 3.0; worker 5.5, 6.5" in text
    target_lines = text.split("targets:\n", 1)[1].splitlines()
    paced_line = next(line for line in target_lines if "over the Kafka floor" in line)
    assert "+2.5 ms" in paced_line
    assert paced_line.endswith("NOT MET")
    assert any(line.endswith("-") and "CPU per command at 0 ms" in line for line in target_lines)
