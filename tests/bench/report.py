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
    by_round = [p for r in good if (p := percentiles(r.request_latencies_ms)) is not None]
    client = [x for r in good for x in r.client_latencies_ms]
    counted = [r for r in good if r.counters]
    counted_s = sum(r.duration_s for r in counted)
    counted_cmds = sum(r.commands for r in counted)

    def per_cmd(name: str) -> float | None:
        if not counted_cmds:
            return None
        return round(sum(r.counters.get(name, 0.0) for r in counted) / counted_cmds, 3)

    return {
        "throughput_cmd_s": round(commands / duration, 1) if duration else None,
        "cpu_us_per_cmd": round(sum(r.cpu_s for r in good) * 1e6 / commands, 1)
        if commands
        else None,
        "peak_rss_mb": round(max(r.peak_rss_mb for r in good), 1) if good else None,
        "latency_ms": percentiles([x for r in good for x in r.latencies_ms]),
        "request_latency_ms": percentiles(http) if http else None,
        # Each round's request p99 and max: how far one round's tail moves from the next.
        "request_p99_by_round_ms": [p["p99"] for p in by_round],
        "request_max_by_round_ms": [p["max"] for p in by_round],
        # worker_client: CancelClient.cancel(), publish -> typed result in hand.
        "client_round_trip_ms": percentiles(client) if client else None,
        # The broker's CPU during the system's runs, per command (also in cpu_elsewhere).
        "broker_cpu_us_per_cmd": _elsewhere(good).get("broker") if commands else None,
        # A worker's transactions committed and flushes (offset commits), off its /metrics.
        "transactions_per_s": round(
            sum(r.counters.get("transactions", 0.0) for r in counted) / counted_s, 1
        )
        if counted_s
        else None,
        "transactions_per_cmd": per_cmd("transactions"),
        "flushes_per_cmd": per_cmd("flushes"),
        "failed_transactions": int(sum(r.counters.get("failed_transactions", 0) for r in counted))
        if counted
        else None,
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


# The targets, each a ratio or a difference between systems measured side by side in the
# same run (absolute figures do not travel between machines).
PACED = ("paced10", "paced100")
RESULT_MARGIN_MS = 10.0  # paced: exactly-once's result p99 at most at-least-once's + this
BROKER_TIMES = 2.0  # paced: the broker's CPU per command beside exactly-once, at most this x
CPU_TIMES = 2.0  # worker CPU per command at 0 ms, at most this x the pipeline floor's
FLOOR_SHARE = 0.8  # worker throughput at 0 ms, at least this share of the pipeline floor's
NAIVE_TIMES = 20.0  # worker throughput at 20 ms, in multiples of the naive loop's
PACED_MARGIN_MS = 2.0  # paced: worker request p99 at most this over the Kafka floor's
WORKERS = ("worker", "worker_at_least_once")

# target -> (what, the value's format, the limit's format); "{s}" is the target's scenario
_TARGET_TEXT = {
    "result_p99_over_at_least_once_ms": (
        "{s}: result p99 over at-least-once's",
        "{:+.1f} ms",
        "at most {:+.0f} ms",
    ),
    "broker_cpu_over_at_least_once": (
        "{s}: broker CPU/cmd / at-least-once's",
        "{:.2f}x",
        "at most {:.0f}x",
    ),
    "request_p99_over_kafka_floor_ms": (
        "{s}: request p99 over the Kafka floor's",
        "{:+.1f} ms",
        "at most {:+.1f} ms",
    ),
    "cpu_over_pipeline_floor": (
        "{s}: CPU/cmd / pipeline floor's",
        "{:.2f}x",
        "at most {:.0f}x",
    ),
    "share_of_pipeline_floor": (
        "{s}: throughput / pipeline floor's",
        "{:.0%}",
        "at least {:.0%}",
    ),
    "times_naive": ("{s}: throughput / naive loop's", "{:.1f}x", "at least {:.0f}x"),
    "scrape_request_p99_change_ms": (
        "{s}: request p99, scraped - not",
        "{:+.1f} ms",
        "noise {:.1f} ms",
    ),
    "scrape_request_max_change_ms": (
        "{s}: request max, scraped - not",
        "{:+.1f} ms",
        "noise {:.1f} ms",
    ),
    "cancel_round_trip_ms": ("{s}: cancel() round trip p99", "{:,.1f} ms", "p50 {:,.1f} ms"),
}


def targets(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets read from one run's pooled figures: each with its figure, the limit it is
    held to and whether it is met (None: a system or scenario it needs did not run).

    Two are not limits set in advance: the scrape's (``worker`` against
    ``worker_unscraped``), held to the run-to-run noise of the same run (the spread of the
    same system's per-round figures), and ``cancel()``'s round trip, reported with its p50 in
    the limit's place and no verdict."""

    def fig(scenario: str, system: str, *path: str) -> Any:
        value: Any = scenarios.get(scenario, {}).get(system)
        for key in path:
            value = None if value is None else value.get(key)
        return value

    out: list[dict[str, Any]] = []

    def check(
        name: str,
        scenario: str,
        system: str,
        value: float | None,
        limit: float | None,
        *,
        most: bool = True,
        judged: bool = True,
        **extra: Any,
    ) -> None:
        met = None
        if judged and value is not None and limit is not None:
            met = value <= limit if most else value >= limit
        out.append(
            {
                "target": name,
                "scenario": scenario,
                "system": system,
                "value": None if value is None else round(value, 3),
                "limit": None if limit is None else round(limit, 3),
                "met": met,
                **extra,
            }
        )

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def noise(scenario: str, systems: tuple[str, ...], key: str) -> float | None:
        """The run-to-run noise: the widest spread of one system's per-round figures."""
        spreads = [
            max(values) - min(values)
            for s in systems
            if len(values := fig(scenario, s, key) or []) > 1
        ]
        return max(spreads) if spreads else None

    ran = {system for systems in scenarios.values() for system in systems}
    for scenario in PACED:
        if not any(s in scenarios.get(scenario, {}) for s in WORKERS):
            continue
        if "worker" in ran:
            check(
                "result_p99_over_at_least_once_ms",
                scenario,
                "worker",
                minus(
                    fig(scenario, "worker", "latency_ms", "p99"),
                    fig(scenario, "worker_at_least_once", "latency_ms", "p99"),
                ),
                RESULT_MARGIN_MS,
            )
            check(
                "broker_cpu_over_at_least_once",
                scenario,
                "worker",
                ratio(
                    fig(scenario, "worker", "broker_cpu_us_per_cmd"),
                    fig(scenario, "worker_at_least_once", "broker_cpu_us_per_cmd"),
                ),
                BROKER_TIMES,
            )
        for system in WORKERS:
            if system in ran:
                check(
                    "request_p99_over_kafka_floor_ms",
                    scenario,
                    system,
                    minus(
                        fig(scenario, system, "request_latency_ms", "p99"),
                        fig(scenario, "kafka_floor", "request_latency_ms", "p99"),
                    ),
                    PACED_MARGIN_MS,
                    jitter_p99_ms=fig(scenario, system, "machine_jitter_ms", "p99"),
                )
    for system in WORKERS:
        if system not in ran:
            continue
        check(
            "cpu_over_pipeline_floor",
            "0ms",
            system,
            ratio(
                fig("0ms", system, "cpu_us_per_cmd"),
                fig("0ms", "pipeline_floor", "cpu_us_per_cmd"),
            ),
            CPU_TIMES,
        )
        check(
            "share_of_pipeline_floor",
            "0ms",
            system,
            ratio(
                fig("0ms", system, "throughput_cmd_s"),
                fig("0ms", "pipeline_floor", "throughput_cmd_s"),
            ),
            FLOOR_SHARE,
            most=False,
        )
        check(
            "times_naive",
            "20ms",
            system,
            ratio(
                fig("20ms", system, "throughput_cmd_s"), fig("20ms", "naive", "throughput_cmd_s")
            ),
            NAIVE_TIMES,
            most=False,
        )
    pair = ("worker", "worker_unscraped")
    for scenario in PACED:
        if not all(s in scenarios.get(scenario, {}) for s in pair):
            continue
        for key, by_round, name in (
            ("p99", "request_p99_by_round_ms", "scrape_request_p99_change_ms"),
            ("max", "request_max_by_round_ms", "scrape_request_max_change_ms"),
        ):
            check(
                name,
                scenario,
                "worker",
                minus(
                    fig(scenario, "worker", "request_latency_ms", key),
                    fig(scenario, "worker_unscraped", "request_latency_ms", key),
                ),
                noise(scenario, pair, by_round),
            )
    for scenario, systems in scenarios.items():
        trip = (systems.get("worker_client") or {}).get("client_round_trip_ms")
        if trip:
            check(
                "cancel_round_trip_ms",
                scenario,
                "worker_client",
                trip["p99"],
                trip["p50"],
                judged=False,
                max=trip["max"],
            )
    return out


def render_targets(checks: list[dict[str, Any]]) -> str:
    """The targets as lines of text: figure, limit, verdict."""
    lines = ["targets:"]
    for c in checks:
        what, shown, limit = _TARGET_TEXT[c["target"]]
        value = "not measured" if c["value"] is None else shown.format(c["value"])
        bound = "-" if c["limit"] is None else limit.format(c["limit"])
        if c["target"] == "cancel_round_trip_ms":
            verdict = "(no limit)"
        else:
            verdict = {True: "met", False: "NOT MET", None: "-"}[c["met"]]
        if c.get("jitter_p99_ms") is not None:
            bound += f"; jitter p99 {c['jitter_p99_ms']:.1f} ms"
        lines.append(
            f"  {c['system']:<22} {what.format(s=c['scenario']):<42} {value:>12}  ({bound})  "
            f"{verdict}"
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
    if report.get("worker_settings"):
        notes.append(
            "every worker system ran with "
            + ", ".join(f"{k}={v}" for k, v in report["worker_settings"].items())
            + " (not the defaults)"
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
    for scenario, systems in report["scenarios"].items():
        paced = {
            system: f["request_p99_by_round_ms"]
            for system, f in systems.items()
            if len(f.get("request_p99_by_round_ms") or ()) > 1
        }
        if paced and report["scenario_settings"].get(scenario, {}).get("rate"):
            notes.append(
                f"{scenario} request p99 by round (ms): "
                + "; ".join(f"{system} {', '.join(map(_ms, p))}" for system, p in paced.items())
            )
    for scenario, systems in report["scenarios"].items():
        txns = {
            system: f
            for system, f in systems.items()
            if f.get("transactions_per_cmd") is not None or f.get("flushes_per_cmd") is not None
        }
        if txns:
            notes.append(
                f"{scenario} transactions/s (per command), flushes per command: "
                + "; ".join(
                    f"{system} {_num(f['transactions_per_s'], 1)} "
                    f"({_num(f['transactions_per_cmd'], 2)}), {_num(f['flushes_per_cmd'], 2)}"
                    for system, f in txns.items()
                )
            )
        for system, f in systems.items():
            if f.get("client_round_trip_ms"):
                notes.append(
                    f"{scenario} {system}: cancel() round trip, publish -> typed result, "
                    f"ms p50/p99/max: {_lat(f['client_round_trip_ms'])}"
                )
    if report.get("targets"):
        notes += ["", render_targets(report["targets"])]
    return "\n".join(out + notes)
