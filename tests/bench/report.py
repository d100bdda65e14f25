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
    return {
        "throughput_cmd_s": round(commands / duration, 1) if duration else None,
        "cpu_us_per_cmd": round(sum(r.cpu_s for r in good) * 1e6 / commands, 1)
        if commands
        else None,
        "peak_rss_mb": round(max(r.peak_rss_mb for r in good), 1) if good else None,
        "latency_ms": percentiles([x for r in good for x in r.latencies_ms]),
        "request_latency_ms": percentiles(http) if http else None,
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
    return {
        "scenarios": {
            scenario: {system: figures(rs) for system, rs in systems.items()}
            for scenario, systems in grouped.items()
        },
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
    return "\n".join(out + notes)
