"""``cancel-worker``: run | sim | send | results | replay | keygen | demo | dev | check |
config.

Only this module configures logging handlers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

import click
import orjson

from worker.logs import RateLimitFilter, TextFormatter
from worker.settings import KAFKA_TLS_PROTOCOLS, Settings, SettingsError, resolve_settings


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())  # control characters in messages escaped
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka is chatty at INFO about routine group coordination; httpx logs every URL at
    # INFO, and a signed URL is not something to keep in logs.
    for noisy in ("aiokafka", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # While a broker is down aiokafka repeats the same errors many times a second; the
    # worker says itself, once, that Kafka is unreachable.
    handler.addFilter(_library_noise)


_library_noise = RateLimitFilter(prefixes=("aiokafka",), burst=5, interval_s=10.0)


CONFIG_EXIT_CODE = 2  # worker.app.ExitCode.CONFIG, without importing the worker here


class ConfigurationError(click.ClickException):
    """A setting or file no worker can run with: one line on stderr, exit code 2."""

    exit_code = CONFIG_EXIT_CODE

    def show(self, file: IO[Any] | None = None) -> None:
        message = " ".join(self.format_message().split("\n"))
        click.echo(f"configuration error: {message}", file=file, err=file is None)


def _settings(config: Path | None) -> Settings:
    return _settings_and_sources(config)[0]


def _settings_and_sources(config: Path | None) -> tuple[Settings, dict[str, str]]:
    """The checked settings and where each value came from (``worker.settings``)."""
    try:
        settings, sources = resolve_settings(os.environ, config)
        _load_kafka_tls(settings)
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None
    return settings, sources


def _load_kafka_tls(settings: Settings) -> None:
    """Load the Kafka TLS material now: a CA file without a certificate or a wrong key
    password is a configuration error, said before anything starts."""
    if settings.kafka_security_protocol in KAFKA_TLS_PROTOCOLS:
        from worker.kafka.io import security_options  # noqa: PLC0415 - only with TLS

        security_options(settings)


def _producer_options(func: Any) -> Any:
    """``--producer-id`` and ``--producer-key-file``: the producer identity to sign with
    (over ``PRODUCER_ID`` / ``PRODUCER_KEY_FILE``)."""
    func = click.option(
        "--producer-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Ed25519 private key (PEM) to sign with (default: PRODUCER_KEY_FILE).",
    )(func)
    return click.option(
        "--producer-id",
        help="Producer id to sign as, from the worker's producers file (default: PRODUCER_ID).",
    )(func)


def _signing(
    settings: Settings, producer_id: str | None, producer_key_file: Path | None
) -> Settings:
    """``settings`` with the command line's producer identity, its key loaded now: a key
    that cannot be loaded is a configuration error, said before anything is published."""
    import dataclasses  # noqa: PLC0415

    from worker.producers import ProducerKeyError, load_private_key  # noqa: PLC0415

    changes: dict[str, Any] = {}
    if producer_id is not None:
        changes["producer_id"] = producer_id
    if producer_key_file is not None:
        changes["producer_key_file"] = producer_key_file
    try:
        settings = dataclasses.replace(settings, **changes).check()
        if settings.producer_key_file is not None:
            load_private_key(settings.producer_key_file)
    except (SettingsError, ProducerKeyError) as exc:
        raise ConfigurationError(str(exc)) from None
    return settings


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file (environment variables override it).",
)


@click.group()
@click.version_option(package_name="cancel-worker")
def cli() -> None:
    """Cancel Binance Portfolio Margin conditional and algo orders from Kafka commands."""


@cli.command()
@config_option
def run(config: Path | None) -> None:
    """Run the worker until SIGTERM/SIGINT (a second signal exits at once, code 3)."""
    settings = _settings(config)  # checked in full, the log level too: no traceback below
    configure_logging(settings.log_level, settings.log_format)
    from worker import tracing  # noqa: PLC0415
    from worker.app import serve  # noqa: PLC0415 - keeps `sim`/`send` start-up light

    tracing.configure()  # OTEL_* variables; nothing without them (docs/tracing.md)
    try:
        code = asyncio.run(serve(settings))
    except OSError as exc:
        # serve() turns every failure of the running worker into an exit code; the one
        # step before it that can raise is binding the metrics endpoint.
        if not settings.metrics_port:
            raise
        raise ConfigurationError(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
            f"(CANCEL_WORKER_METRICS_HOST / CANCEL_WORKER_METRICS_PORT): {exc}"
        ) from None
    finally:
        tracing.shutdown()  # the spans still buffered are exported
    sys.exit(int(code))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=int, help="0 picks a free port.")
@click.option(
    "--accounts",
    "accounts_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Accounts TOML (same format as the worker's): API keys and verification keys.",
)
@click.option(
    "--retire-um-conditional",
    is_flag=True,
    help="Answer 404 on /papi/v1/um/conditional/*, as a retired route does.",
)
@click.option("--clock-skew-ms", default=0, type=int, help="Simulator clock minus local clock.")
@click.option(
    "--seed",
    "seed_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON file {"orders": [...]} of orders to place in the book at start-up.',
)
@click.option(
    "--fault-profile",
    default="none",
    show_default=True,
    help="Named fault profile (none, latency, timeouts, resets, 5xx, unknown-503, "
    "unknown-1006, storm-429, ban-418).",
)
@click.option("--fault-seed", default=0, type=int, help="Seed of the fault profile's draws.")
@click.option(
    "--order-limit",
    default=1200,
    show_default=True,
    type=int,
    help="Orders per account per window.",
)
@click.option("--order-window-ms", default=60_000, show_default=True, type=int)
@click.option(
    "--weight-limit",
    default=6000,
    show_default=True,
    type=int,
    help="IP request weight per window.",
)
@click.option("--weight-window-ms", default=60_000, show_default=True, type=int)
@click.option(
    "--log-level",
    default="INFO",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
)
def sim(
    host: str,
    port: int,
    accounts_file: Path,
    retire_um_conditional: bool,
    clock_skew_ms: int,
    seed_file: Path | None,
    fault_profile: str,
    fault_seed: int,
    order_limit: int,
    order_window_ms: int,
    weight_limit: int,
    weight_window_ms: int,
    log_level: str,
) -> None:
    """Serve the PAPI simulator."""
    from worker.exchange.accounts import AccountsError, load_accounts  # noqa: PLC0415
    from worker.tools.sim.app import SimConfig  # noqa: PLC0415
    from worker.tools.sim.faults import PROFILES  # noqa: PLC0415
    from worker.tools.sim.server import serve_forever  # noqa: PLC0415

    configure_logging(log_level)
    if fault_profile not in PROFILES:
        raise click.BadParameter(
            f"known profiles: {', '.join(sorted(PROFILES))}", param_hint="--fault-profile"
        )
    config = SimConfig(
        um_conditional_enabled=not retire_um_conditional,
        clock_skew_ms=clock_skew_ms,
        profile=fault_profile,
        seed=fault_seed,
        order_limit=order_limit,
        order_window_ms=order_window_ms,
        weight_limit=weight_limit,
        weight_window_ms=weight_window_ms,
    )
    try:
        seed = orjson.loads(seed_file.read_bytes())["orders"] if seed_file is not None else []
        asyncio.run(serve_forever(load_accounts(accounts_file), host, port, config, seed))
    except AccountsError as exc:
        raise ConfigurationError(str(exc)) from None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise click.ClickException(f"cannot seed the book from {seed_file}: {exc}") from exc


@cli.command()
@config_option
@click.option("--json", "payload", help="The command as JSON (checked like the options are).")
@click.option("--command-id", help="Default: a fresh one (c-...).")
@click.option("--account")
@click.option("--market", type=click.Choice(["UM", "CM"]))
@click.option("--symbol", help="Required, algo cancels too: commands are keyed account:symbol.")
@click.option("--strategy-id", type=int)
@click.option("--client-strategy-id")
@click.option("--algo-id", type=int)
@click.option("--client-algo-id")
@click.option(
    "--all",
    "all",
    is_flag=True,
    help="Kill switch: cancel every open order of the account on --symbol (no order id).",
)
@click.option("--expires-in-ms", type=int, help="Set expires_at this far in the future.")
@click.option("--reason")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=30.0,
    default=None,
    help="Wait up to SECONDS (30 when given alone) for the result, print it, exit by outcome.",
)
@click.option("--raw", is_flag=True, help="With --wait: print the result event as published.")
@_producer_options
@click.option(
    "--unsigned",
    is_flag=True,
    help="Send without a signature (only a worker with REQUIRE_SIGNED_COMMANDS=false takes it).",
)
def send(
    config: Path | None,
    payload: str | None,
    wait_s: float | None,
    raw: bool,
    producer_id: str | None,
    producer_key_file: Path | None,
    unsigned: bool,
    **fields: Any,
) -> None:
    """Publish one cancel command (or, with --all, a kill switch) to the commands topic.

    The command is checked as the client library checks it before anything is published
    (exit 2 with the reason) and keyed account:symbol, and signed as --producer-id with
    --producer-key-file (or PRODUCER_ID / PRODUCER_KEY_FILE). Exit codes with --wait: 0
    canceled (a kill switch: complete), 1 failed, incomplete or unreadable (and Kafka
    failures), 2 invalid command or configuration, 5 no result in time, 6 duplicate
    command id."""
    from worker.cli.send import (  # noqa: PLC0415
        EXIT_NO_RESULT,
        KafkaUnavailableError,
        build_command,
        check,
        describe,
        describe_unreadable,
        exit_code,
        parse_json_command,
        publish,
    )
    from worker.client import InvalidCommandError, ResultUnreadableError  # noqa: PLC0415

    settings = _signing(_settings(config), producer_id, producer_key_file)
    # The outcome is said here, in one line; aiokafka's own retries would only add noise.
    configure_logging("CRITICAL", settings.log_format)
    try:
        if payload is not None:
            if any(v not in (None, False) for v in fields.values()):
                raise click.UsageError("--json carries the whole command: give no other field")
            command = parse_json_command(payload)
        else:
            command = build_command(**fields)
        value = check(command)
    except ValueError as exc:  # InvalidCommandError included
        name = "invalid command" if isinstance(exc, InvalidCommandError) else "usage"
        raise InvalidArgument(f"{name}: {exc}") from None
    if not settings.producer_id and not unsigned:
        raise InvalidArgument(
            "no producer to sign as: give --producer-id and --producer-key-file (or set "
            "CANCEL_WORKER_PRODUCER_ID and CANCEL_WORKER_PRODUCER_KEY_FILE); --unsigned "
            "only for a worker with CANCEL_WORKER_REQUIRE_SIGNED_COMMANDS=false"
        )

    def sent(where: str) -> None:
        click.echo(f"sent to {where}: {value.decode()}", err=wait_s is not None)
        if wait_s is not None:
            click.echo(f"waiting up to {wait_s:g}s for its result ...", err=True)

    try:
        result = asyncio.run(publish(settings, command, wait_s=wait_s, on_sent=sent))
    except KafkaUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    except ResultUnreadableError as exc:
        click.echo(exc.raw.decode(errors="replace") if raw else describe_unreadable(exc))
        sys.exit(1)
    if wait_s is None:
        return
    if result is None:
        click.echo(
            f"no result for command {command['command_id']} within {wait_s:g}s: it was "
            "published and may still be executed; look it up with: cancel-worker results "
            f"--command-id {command['command_id']}",
            err=True,
        )
        sys.exit(EXIT_NO_RESULT)
    click.echo(orjson.dumps(result.raw).decode() if raw else describe(result))
    sys.exit(exit_code(result))


class InvalidArgument(click.ClickException):
    """A command line that cannot be sent: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(" ".join(self.format_message().split()), file=file, err=file is None)


@cli.command()
@config_option
@click.option(
    "--command-id",
    "command_ids",
    multiple=True,
    help="A command id to look up (repeatable); none: every result.",
)
@click.option("--since", help="First record time: ms since the epoch or ISO-8601 (UTC if naive).")
@click.option(
    "--follow",
    is_flag=True,
    help="Then print new results as they come (until every --command-id has one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each event as published.")
def results(
    config: Path | None,
    command_ids: tuple[str, ...],
    since: str | None,
    follow: bool,
    as_json: bool,
) -> None:
    """Look results up on the results topic by command id, or follow them as they come.

    Reads read_committed, from the beginning (or --since) to the end, one line per result.
    Exit codes: 0 every --command-id has a result, 1 Kafka failed, 2 bad arguments,
    5 some --command-id has none."""
    from worker.cli.replay import parse_time  # noqa: PLC0415
    from worker.cli.send import (  # noqa: PLC0415
        EXIT_NO_RESULT,
        KafkaUnavailableError,
        describe,
        describe_unreadable,
    )
    from worker.cli.send import results as read_results  # noqa: PLC0415
    from worker.client import ResultError  # noqa: PLC0415

    settings = _settings(config)
    configure_logging("CRITICAL", settings.log_format)
    try:
        since_ms = None if since is None else parse_time(since)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from exc

    def emit(event: dict[str, Any], item: Any) -> None:
        if as_json:
            click.echo(orjson.dumps(event).decode())
        elif isinstance(item, ResultError):
            click.echo(describe_unreadable(item))
        else:
            click.echo(describe(item))

    try:
        found = asyncio.run(
            read_results(settings, command_ids, since_ms=since_ms, follow=follow, emit=emit)
        )
    except KafkaUnavailableError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    missing = [c for c in dict.fromkeys(command_ids) if c not in found]
    for command_id in missing:
        click.echo(f"no result for command {command_id} on {settings.results_topic}", err=True)
    sys.exit(EXIT_NO_RESULT if missing else 0)


@cli.command()
@config_option
@click.option(
    "--from-topic",
    type=click.Choice(["commands", "deadletter"]),
    default="commands",
    show_default=True,
    help="Read the commands topic or the dead-letter topic (always publish to commands).",
)
@click.option("--partition", type=int, help="Only this partition (default: all).")
@click.option("--start-offset", type=int, help="First offset (needs --partition).")
@click.option("--end-offset", type=int, help="Stop before this offset (exclusive).")
@click.option("--since", help="First record time: ms since the epoch or ISO-8601 (UTC if naive).")
@click.option("--until", help="Stop at records from this time on (exclusive); same formats.")
@click.option(
    "--skip-processed",
    is_flag=True,
    help="Skip command ids that already have a final result on the results topic.",
)
@click.option(
    "--restamp",
    is_flag=True,
    help="Set issued_at to now and move expires_at (if any) by as much.",
)
@click.option("--expires-in-ms", type=int, help="Set expires_at to now plus this.")
@click.option(
    "--failed",
    is_flag=True,
    help="Re-drive the commands whose latest result is a failure that may be re-driven "
    "(REASON... names which; default: exchange_unavailable, rate_limited, "
    "retries_exhausted, outcome_unknown, expired; auth and unknown_account only when "
    "named), and publish those with no final result yet; skip the rest.",
)
@click.argument("reasons", nargs=-1, metavar="[REASON...]")
@click.option("--dry-run", is_flag=True, help="Print one line per record; send nothing.")
@_producer_options
def replay(
    config: Path | None,
    producer_id: str | None,
    producer_key_file: Path | None,
    from_topic: str,
    partition: int | None,
    start_offset: int | None,
    end_offset: int | None,
    since: str | None,
    until: str | None,
    skip_processed: bool,
    restamp: bool,
    expires_in_ms: int | None,
    failed: bool,
    reasons: tuple[str, ...],
    dry_run: bool,
) -> None:
    """Publish a range of commands (or dead letters) to the commands topic again.

    With --failed, re-drive failed cancels: each re-driven copy passes the worker's
    duplicate window on purpose (it names the failure it retries in x-redrive-of), its
    result carries retry_of, and an accidental repeat still gets cancel.duplicate.

    A copy sent byte for byte keeps its producer's signature; a copy whose bytes change
    (--restamp, --expires-in-ms, a re-drive) is signed anew as the operator's producer
    (--producer-id and --producer-key-file, or PRODUCER_ID / PRODUCER_KEY_FILE), which the
    worker checks as any other: without one such a run is refused (exit 2).

    Bounded by the end offsets found at start; every publish is acknowledged before the
    summary line. Exit codes: 0 done, 1 Kafka failed (the message says how many records
    were published), 2 bad arguments.
    """
    from worker.cli.replay import (  # noqa: PLC0415
        ConsoleReport,
        ReplayArgumentError,
        ReplayError,
        ReplayRequest,
        parse_time,
    )
    from worker.cli.replay import replay as run_replay  # noqa: PLC0415

    settings = _signing(_settings(config), producer_id, producer_key_file)
    configure_logging(settings.log_level, settings.log_format)
    times: dict[str, int | None] = {}
    for name, text in (("since", since), ("until", until)):
        try:
            times[name] = None if text is None else parse_time(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"--{name}") from exc
    request = ReplayRequest(
        from_topic=from_topic,
        partition=partition,
        start_offset=start_offset,
        end_offset=end_offset,
        since_ms=times["since"],
        until_ms=times["until"],
        skip_processed=skip_processed,
        restamp=restamp,
        expires_in_ms=expires_in_ms,
        dry_run=dry_run,
        failed=_failed_reasons(failed, reasons),
    )
    try:
        summary = asyncio.run(
            run_replay(settings, request.check(), observer=ConsoleReport(dry_run=dry_run))
        )
    except ReplayArgumentError as exc:
        raise click.UsageError(str(exc)) from exc
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary.line())


def _failed_reasons(failed: bool, reasons: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--failed`` and its REASON words (commas allowed) as the request's ``failed``."""
    names = tuple(n for word in reasons for n in word.split(",") if n)
    if names and not failed:
        raise click.UsageError(
            f"unexpected argument(s) {' '.join(reasons)}: REASON goes with --failed"
        )
    return names if failed else None


@cli.command()
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for <ID>.key (the private key, mode 0600) and <ID>.pub.",
)
@click.option("--producer", "producer_id", required=True, help="The producer's id.")
@click.option(
    "--account",
    "accounts",
    multiple=True,
    help='An account it may name (repeatable; "*" for every account).',
)
@click.option("--kill-switch", is_flag=True, help="It may send kill switches (scope symbol).")
def keygen(out_dir: Path, producer_id: str, accounts: tuple[str, ...], kill_switch: bool) -> None:
    """Make a producer's Ed25519 key pair; print its [producers.ID] table for the worker's
    producers file.

    The private key stays with the producer (PRODUCER_KEY_FILE, or the client library's
    private_key); the worker holds only the public key. Never overwrites a file. Exit
    codes: 0 written, 2 bad id or the key file exists."""
    from worker.producers import ProducerKeyError, generate, stanza  # noqa: PLC0415

    try:
        path, key = generate(out_dir, producer_id)
    except ProducerKeyError as exc:
        raise InvalidArgument(str(exc)) from None
    click.echo(f"private key written to {path} (mode 0600): give it to the producer only", err=True)
    click.echo(stanza(producer_id, key, accounts, kill_switch), nl=False)


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the broker's data dir afterwards.")
@click.option("--verbose", is_flag=True, help="Echo the worker's and simulator's logs.")
@click.option(
    "--trace",
    is_flag=True,
    help="Print the kill switch's trace (client and worker spans; needs the otel extra).",
)
def demo(keep: bool, verbose: bool, trace: bool) -> None:
    """Start a broker, the simulator and the worker; send a mixed batch; print the results."""
    from worker.tools.demo import run_demo  # noqa: PLC0415

    configure_logging("WARNING")
    sys.exit(run_demo(keep=keep, verbose=verbose, trace=trace))


@cli.command()
@click.option("--kafka-port", default=9092, show_default=True, type=int)
@click.option("--controller-port", default=9093, show_default=True, type=int)
@click.option("--sim-port", default=8765, show_default=True, type=int, help="0 picks a free one.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The broker's data (default .local/dev; emptied at every start).",
)
@click.option("--quiet", is_flag=True, help="Do not echo the worker's and simulator's logs.")
def dev(
    kafka_port: int, controller_port: int, sim_port: int, data_dir: Path | None, quiet: bool
) -> None:
    """A local stack by hand: Kafka, the simulator (seeded from deploy/dev/) and the worker,
    on the worker's default ports and topics, until Ctrl-C.

    Exit codes: 0 stopped by Ctrl-C or SIGTERM, 1 a part failed, 2 a port in use."""
    from worker.tools.dev import DEV_DIR, run_dev  # noqa: PLC0415

    configure_logging("WARNING")
    sys.exit(
        run_dev(
            kafka_port=kafka_port,
            controller_port=controller_port,
            sim_port=sim_port,
            data_dir=data_dir or DEV_DIR,
            quiet=quiet,
        )
    )


@cli.command()
@config_option
@click.option("--create-topics", is_flag=True, help="Create missing topics first.")
@click.option("--partitions", default=6, show_default=True, help="For --create-topics.")
@click.option(
    "--ping",
    "ping_exchange",
    is_flag=True,
    help="Also send each account one signed read-only request (weight 1) to the exchange.",
)
@click.option(
    "--timeout",
    "kafka_timeout_s",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the broker, then the topics, may take to answer.",
)
@click.option(
    "--skip",
    multiple=True,
    type=click.Choice(["broker", "topics", "accounts", "clock"]),
    help="Leave a check out (repeatable), e.g. clock for a job that only creates topics.",
)
@click.option("--taxonomy", is_flag=True, help="Print the error taxonomy table and exit.")
def check(
    config: Path | None,
    create_topics: bool,
    partitions: int,
    ping_exchange: bool,
    kafka_timeout_s: float,
    skip: tuple[str, ...],
    taxonomy: bool,
) -> None:
    """Check settings, broker, topics, accounts and the exchange clock (and, with --ping,
    each account's key at the exchange): one line per check, then a summary.

    Exit codes: 0 every check passed, 1 a check failed, 2 configuration error."""
    if taxonomy:
        from worker.core.errors import taxonomy_markdown  # noqa: PLC0415

        click.echo(taxonomy_markdown())
        return
    from worker.cli.checkup import run_checks  # noqa: PLC0415

    settings, sources = _settings_and_sources(config)
    # The report says what failed; library logs (aiokafka's connection errors) add nothing.
    configure_logging("CRITICAL", settings.log_format)
    report = asyncio.run(
        run_checks(
            settings,
            sources,
            config_file=config,
            create_topics=create_topics,
            partitions=partitions,
            ping_exchange=ping_exchange,
            kafka_timeout_s=kafka_timeout_s,
            skip=skip,
        )
    )
    for line in report.lines():
        click.echo(line)
    sys.exit(0 if report.ok else 1)


@cli.command("config")
@config_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object: each setting's value, source and variable.",
)
def config_command(config: Path | None, as_json: bool) -> None:
    """Print every setting, its value and its source (default, file, env); secrets redacted."""
    from worker.cli.config_report import config_entries, render_json, render_text  # noqa: PLC0415

    settings, sources = _settings_and_sources(config)
    entries = config_entries(settings, sources)
    click.echo(render_json(entries, config) if as_json else render_text(entries, config))


def main() -> None:
    cli(prog_name="cancel-worker")
