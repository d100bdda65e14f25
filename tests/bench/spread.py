"""``python -m tests.bench.spread RESULTS.json ...``: each target over several bench runs.

Reads the ``targets`` of each ``make bench`` results file (``--out`` keeps each run's) and
prints, per target, its figure in every run, their min to max, and in how many runs it was met:
a target met in some runs only holds on average at best.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from tests.bench.report import _TARGET_TEXT


def spread(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target (name, scenario, system), in the order of the first run that has it."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for report in reports:
        for check in report.get("targets", []):
            key = (check["target"], check["scenario"], check["system"])
            row = rows.setdefault(
                key,
                {
                    "target": check["target"],
                    "scenario": check["scenario"],
                    "system": check["system"],
                    "values": [],
                    "limits": [],
                    "met": [],
                },
            )
            row["values"].append(check["value"])
            row["limits"].append(check["limit"])
            row["met"].append(check["met"])
    out = []
    for row in rows.values():
        values = [v for v in row["values"] if v is not None]
        row["min"] = min(values) if values else None
        row["max"] = max(values) if values else None
        out.append(row)
    return out


def render(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        what, shown, limit = _TARGET_TEXT[row["target"]]

        def fmt(value: float | None, shown: str = shown) -> str:
            return "-" if value is None else shown.format(value)

        judged = [m for m in row["met"] if m is not None]
        verdict = f"met {sum(judged)}/{len(judged)}" if judged else "not judged"
        limits = {x for x in row["limits"] if x is not None}
        bound = (
            limit.format(next(iter(limits)))
            if len(limits) == 1
            else f"{len(limits)} limits"
            if limits
            else "-"
        )
        lines.append(
            f"{row['system']:<22} {what.format(s=row['scenario']):<42} "
            f"{fmt(row['min'])} to {fmt(row['max'])}  ({bound})  {verdict}; runs: "
            + ", ".join(fmt(v) for v in row["values"])
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    reports = [orjson.loads(Path(a).read_bytes()) for a in argv]
    print(render(spread(reports)))


if __name__ == "__main__":
    main(sys.argv[1:])
