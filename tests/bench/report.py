"""The bench's results: pooled per system and scenario, as JSON and as a table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tests.bench.measure import percentiles

if TYPE_CHECKING:
    from tests.bench.main import Run


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


def _elsewhere(runs: Sequence[Run]) -> dict[str, float]:
    """CPU of the simulator, the broker and the bench itself per command, during the runs."""
    good = [r for r in runs if r.duration_s > 0]
    commands = sum(r.commands for r in good)
    names = sorted({n for r in good for n in r.cpu_elsewhere_s})
    return {
        n: round(sum(r.cpu_elsewhere_s.get(n, 0.0) for r in good) * 1e6 / commands, 1)
        for n in names
    }


def figures(runs: Sequence[Run]) -> dict[str, Any]:
    """One system's figures in one scenario, pooled over its rounds (failed runs left out)."""
    good = [r for r in runs if r.duration_s > 0]
    commands = sum(r.commands for r in good)
    duration = sum(r.duration_s for r in good)
    http = [x for r in good for x in r.request_latencies_ms]
    round_p99 = [p["p99"] for r in good if (p := percentiles(r.request_latencies_ms)) is not None]
    return {
        "throughput_cmd_s": round(commands / duration, 1) if duration else None,
        "cpu_us_per_cmd": round(sum(r.cpu_s for r in good) * 1e6 / commands, 1)
        if commands
        else None,
        "peak_rss_mb": round(max(r.peak_rss_mb for r in good), 1) if good else None,
        "latency_ms": percentiles([x for r in good for x in r.latencies_ms]),
        "request_latency_ms": percentiles(http) if http else None,
        # Each round's request p99: how far one round's tail moves from the next.
        "request_p99_by_round_ms": round_p99,
        # How late a process sleeping 10 ms woke up meanwhile: the machine's own noise.
        "machine_jitter_ms": percentiles([x for r in good for x in r.jitter_ms]),
    }


def results_json(
    runs: Sequence[Run],
    *,
    plan_name: str,
    rounds: dict[str, int],
    scenarios: dict[str, Any],
    started_at: str,
    wall_s: float,
    machine: dict[str, Any],
    load_before: tuple[float, float, float],
    extra: dict[str, Any],
    samples: bool = False,
) -> dict[str, Any]:
    grouped: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        grouped.setdefault(run.scenario, {}).setdefault(run.system, []).append(run)
    pooled = {
        scenario: {system: figures(rs) for system, rs in systems.items()}
        for scenario, systems in grouped.items()
    }
    return {
        "scenarios": pooled,
        "targets": targets(pooled),
        "commands": {
            scenario: {system: sum(r.commands for r in rs) for system, rs in systems.items()}
            for scenario, systems in grouped.items()
        },
        "load_average": {
            "before": [round(x, 2) for x in load_before],
            "during": {
                scenario: {
                    system: _mean([x for r in rs for x in r.load_samples])
                    for system, rs in systems.items()
                }
                for scenario, systems in grouped.items()
            },
        },
        "machine_busy_cores": {
            scenario: {
                system: _mean([r.busy_cores for r in rs if r.duration_s])
                for system, rs in systems.items()
            }
            for scenario, systems in grouped.items()
        },
        "cpu_us_per_cmd_elsewhere": {
            scenario: {system: _elsewhere(rs) for system, rs in systems.items()}
            for scenario, systems in grouped.items()
        },
        "failed_results": {
            scenario: {system: sum(r.failed for r in rs) for system, rs in systems.items()}
            for scenario, systems in grouped.items()
        },
        "scenario_settings": scenarios,
        "plan": plan_name,
        "rounds": rounds,
        "started_at": started_at,
        "wall_s": round(wall_s, 1),
        "machine": machine,
        **extra,
        "runs": [r.summary(samples=samples) for r in runs],
        "errors": [
            f"{r.scenario} {r.system} round {r.round + 1}: {r.error}" for r in runs if r.error
        ],
    }


# The targets for the worker, each read from one run's pooled figures.
CPU_LIMIT_US = 500.0  # worker CPU per command, in the bursts
FLOOR_SHARE = 0.5  # worker throughput at 0 ms, as a share of the pipeline floor's
NAIVE_TIMES = 20.0  # worker throughput at 20 ms, in multiples of the naive loop's
PACED_MARGIN_MS = 2.0  # paced: worker request p99 at most this over the Kafka floor's
WORKERS = ("worker", "worker_at_least_once")


def targets(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The speed targets, per worker system that ran: the figure, the limit it is held to
    and whether it is met (None: a system or scenario the figure needs did not run)."""

    def fig(scenario: str, system: str, *path: str) -> Any:
        value: Any = scenarios.get(scenario, {}).get(system)
        for key in path:
            value = None if value is None else value.get(key)
        return value

    out: list[dict[str, Any]] = []

    def check(name: str, system: str, value: float | None, limit: float, *, most: bool) -> None:
        met = None if value is None else (value <= limit if most else value >= limit)
        out.append(
            {
                "target": name,
                "system": system,
                "value": None if value is None else round(value, 2),
                "limit": limit,
                "met": met,
            }
        )

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    for system in WORKERS:
        if not any(system in systems for systems in scenarios.values()):
            continue
        for scenario in ("0ms", "20ms"):
            cpu = fig(scenario, system, "cpu_us_per_cmd")
            check(f"cpu_us_per_cmd_{scenario}", system, cpu, CPU_LIMIT_US, most=True)
        share = ratio(
            fig("0ms", system, "throughput_cmd_s"), fig("0ms", "pipeline_floor", "throughput_cmd_s")
        )
        check("share_of_pipeline_floor_0ms", system, share, FLOOR_SHARE, most=False)
        times = ratio(
            fig("20ms", system, "throughput_cmd_s"), fig("20ms", "naive", "throughput_cmd_s")
        )
        check("times_naive_20ms", system, times, NAIVE_TIMES, most=False)
        mine = fig("paced100", system, "request_latency_ms", "p99")
        floor = fig("paced100", "kafka_floor", "request_latency_ms", "p99")
        over = None if mine is None or floor is None else mine - floor
        check("paced_p99_over_kafka_floor_ms", system, over, PACED_MARGIN_MS, most=True)
    return out


_TARGET_TEXT = {
    "cpu_us_per_cmd_0ms": ("CPU per command at 0 ms", "{:,.0f} µs", "at most {:,.0f} µs"),
    "cpu_us_per_cmd_20ms": ("CPU per command at 20 ms", "{:,.0f} µs", "at most {:,.0f} µs"),
    "share_of_pipeline_floor_0ms": (
        "throughput at 0 ms / pipeline floor",
        "{:.0%}",
        "at least {:.0%}",
    ),
    "times_naive_20ms": ("throughput at 20 ms / naive", "{:.1f}x", "at least {:.0f}x"),
    "paced_p99_over_kafka_floor_ms": (
        "paced request p99 over the Kafka floor",
        "{:+.1f} ms",
        "at most {:+.1f} ms",
    ),
}


def render_targets(checks: list[dict[str, Any]]) -> str:
    """The targets as lines of text: figure, limit, verdict."""
    lines = ["targets:"]
    for c in checks:
        what, shown, limit = _TARGET_TEXT[c["target"]]
        value = "not measured" if c["value"] is None else shown.format(c["value"])
        verdict = {True: "met", False: "NOT MET", None: "-"}[c["met"]]
        lines.append(
            f"  {c['system']:<22} {what:<40} {value:>14}  ({limit.format(c['limit'])})  {verdict}"
        )
    return "\n".join(lines)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _lat(value: dict[str, float] | None) -> str:
    if value is None:
        return "-"
    return " / ".join(_ms(value[k]) for k in ("p50", "p99", "max"))


def _ms(value: float) -> str:
    """Tenths of a ms where they matter (a paced run's few ms), whole ms above 100."""
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def render_table(report: dict[str, Any]) -> str:
    header = (
        "scenario",
        "system",
        "commands",
        "cmd/s",
        "result ms p50/p99/max",
        "request ms p50/p99/max",
        "CPU µs/cmd",
        "RSS MB",
        "jitter ms p99",
        "sim µs/cmd",
        "broker µs/cmd",
        "load",
        "busy cores",
    )
    rows: list[tuple[str, ...]] = []
    fewer = False
    for scenario, systems in report["scenarios"].items():
        most = max(report["commands"][scenario].values())
        for system, f in systems.items():
            count = report["commands"][scenario][system]
            mark = "*" if count < most else ""
            elsewhere = report["cpu_us_per_cmd_elsewhere"][scenario][system]
            fewer = fewer or bool(mark)
            rows.append(
                (
                    scenario,
                    system,
                    f"{count:,}{mark}",
                    _num(f["throughput_cmd_s"]),
                    _lat(f["latency_ms"]),
                    _lat(f["request_latency_ms"]),
                    _num(f["cpu_us_per_cmd"]),
                    _num(f["peak_rss_mb"]),
                    _num((f.get("machine_jitter_ms") or {}).get("p99"), 1),
                    _num(elsewhere.get("simulator")),
                    _num(elsewhere.get("broker")),
                    _num(report["load_average"]["during"][scenario][system], 2),
                    _num(report["machine_busy_cores"][scenario][system], 2),
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {2, 3, 6, 7, 8, 9, 10, 11, 12}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    previous = None
    for row in rows:
        if previous is not None and row[0] != previous:
            out.append("")
        out.append(line(row))
        previous = row[0]
    settings = report["scenario_settings"]
    notes = [
        "",
        "scenarios: "
        + "; ".join(
            f"{name}: exchange latency {s['latency_ms']} ms, "
            + (f"paced at {s['rate']:g} commands/s" if s["rate"] else "all commands at once")
            for name, s in settings.items()
        ),
        "commands over 50 keys and 5 accounts; rounds per system: "
        + ", ".join(f"{name} {n}" for name, n in report["rounds"].items())
        + "; latency from the command's produce time; request = arrival at the exchange; "
        "result = durable result seen by a read_committed consumer; jitter: how late a "
        "process sleeping 10 ms woke up during the runs (the machine's own noise); "
        "sim and broker µs/cmd: their CPU during the system's runs",
    ]
    if fewer:
        notes.append("* fewer commands: this system is slow here")
    if report.get("txn_load"):
        notes.append(
            "--txn-load: an exactly-once worker's transactions ran beside every system "
            "(broker µs/cmd includes them)"
        )
    failed = {
        f"{scenario}/{system}": n
        for scenario, systems in report["failed_results"].items()
        for system, n in systems.items()
        if n
    }
    if failed:
        notes.append(f"results that were not a successful cancel: {failed}")
    notes += [f"error: {e.splitlines()[0]}" for e in report["errors"]]
    paced = {
        system: f["request_p99_by_round_ms"]
        for system, f in report["scenarios"].get("paced100", {}).items()
        if len(f.get("request_p99_by_round_ms") or ()) > 1
    }
    if paced:
        notes.append(
            "paced request p99 by round (ms): "
            + "; ".join(f"{system} {', '.join(map(_ms, p))}" for system, p in paced.items())
        )
    if report.get("targets"):
        notes += ["", render_targets(report["targets"])]
    return "\n".join(out + notes)
