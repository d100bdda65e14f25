"""OpenTelemetry tracing, optional: the ``otel`` extra (``pip install 'cancel-worker[otel]'``).

The worker records spans only when :func:`configure` found them asked for by the standard
``OTEL_*`` environment variables (``OTEL_TRACES_EXPORTER``, or an OTLP endpoint) and the
extra is installed; otherwise :data:`ON` stays False, ``opentelemetry`` is never imported,
and the hot path pays one module-attribute test per record and per request. Tracing is
never a reason not to cancel: an exporter that cannot be set up, or a missing extra, is
said once at WARNING and the worker runs untraced.

What a command's trace holds (docs/tracing.md has the picture):

* ``process <commands topic>`` (CONSUMER): the command, from the handler's start to its
  result record; its parent is the record's W3C ``traceparent``/``tracestate`` headers, or
  none (a command without them starts a trace). Kafka attributes per OpenTelemetry's
  messaging conventions (``messaging.system``, ``messaging.destination.name``,
  ``messaging.destination.partition.id``, ``messaging.kafka.offset``,
  ``messaging.kafka.message.key``, ``messaging.consumer.group.name``...), and the result's
  type and reason;
* ``validate command``: signature, decoding, bounds and entitlement;
* ``governor wait``: admission by the rate governor, per request;
* ``<METHOD> <path>`` (CLIENT): each HTTP attempt to the exchange, with the method, the
  route's path as ``url.template``, the server, the status, ``binance.code``, the route and
  the attempt number (how many times the command has sent this same request: its retries
  count up); never the query string, the signature or the key;
* ``reconcile order``: each reconciliation (its status queries are attempts under it);
* ``create <results topic>`` (PRODUCER): the result record handed to the transactional
  producer; its context is the result's ``traceparent`` header, so a consumer of results
  continues the trace.

Only the W3C Trace Context headers are read and written (``OTEL_PROPAGATORS`` is not
consulted): they are the records' contract (schemas/asyncapi.yaml).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
"""The W3C Trace Context headers a command may carry and a result carries."""
TRACESTATE_MAX_BYTES = 512
"""A longer ``tracestate`` is not copied onto results (W3C: at least 512 characters are
propagated); records stay within their size bound."""

INSTRUMENTATION_NAME = "cancel-worker"

# Span names.
VALIDATE = "validate command"
GOVERNOR_WAIT = "governor wait"
RECONCILE = "reconcile order"

# Attributes: OpenTelemetry's where one fits, the worker's own under ``cancel_worker.``.
COMMAND_ID = "cancel_worker.command_id"
ACCOUNT = "cancel_worker.account"
RESULT_TYPE = "cancel_worker.result.type"
RESULT_REASON = "cancel_worker.result.reason"
ROUTE = "cancel_worker.route"
ATTEMPT = "cancel_worker.attempt"
BINANCE_CODE = "binance.code"
ERROR_TYPE = "error.type"

Header = tuple[str, bytes | None]

ON = False
"""Whether the worker's spans are recorded (set by :func:`configure` or :func:`enable`)."""

_tracer: Tracer | None = None
_otel: _Otel | None = None  # the API's names, bound once by enable()
_owned: TracerProvider | None = None  # made by configure(): flushed by shutdown()
# Per command: how many times each request (method, path and parameters) was sent: the
# attempt number of its span. Only the count is recorded, never the parameters.
_ATTEMPTS: contextvars.ContextVar[dict[tuple[str, str, str], int] | None] = contextvars.ContextVar(
    "cancel_worker_attempts", default=None
)


class _Otel:
    """The API's names the span helpers use, imported once."""

    def __init__(self) -> None:
        from opentelemetry import trace  # noqa: PLC0415 - optional
        from opentelemetry.context import Context  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        self.Context = Context
        self.SpanKind = trace.SpanKind
        self.Status = trace.Status
        self.StatusCode = trace.StatusCode
        self.get_current_span = trace.get_current_span
        self.propagator = TraceContextTextMapPropagator()


class SpanLike(Protocol):
    def set_attribute(self, key: str, value: Any) -> None: ...


class _NoSpan:
    """What a span helper gives when nothing is recorded."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NOOP = _NoSpan()


# -- set-up ------------------------------------------------------------------------------------

_api_module: ModuleType | None = None
_api_missing = False


def _api() -> ModuleType | None:
    """``opentelemetry.trace``, imported on first use; None when the extra is not installed."""
    global _api_module, _api_missing  # noqa: PLW0603 - one import, remembered
    if _api_module is None and not _api_missing:
        try:
            from opentelemetry import trace  # noqa: PLC0415 - optional, imported on demand
            from opentelemetry.trace.propagation import tracecontext  # noqa: F401, PLC0415
        except ImportError:
            _api_missing = True
        else:
            _api_module = trace
    return _api_module


def available() -> bool:
    """Whether the ``otel`` extra's API is importable (imported by the first call: the
    client library calls it when it is made, so that no publish waits for the import)."""
    return _api() is not None


def wanted(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the environment asks for: ``OTEL_TRACES_EXPORTER`` (a comma list;
    ``none`` is none), else ``otlp`` when an OTLP endpoint is set; nothing when
    ``OTEL_SDK_DISABLED`` is true. Unlike the SDK's own auto-configuration, no variable
    means no tracing: installing the extra does not start sending to localhost."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not names:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return ["otlp"] if any(environ.get(e, "").strip() for e in endpoints) else []
    return [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]


def configure(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn the worker's spans on as the ``OTEL_*`` variables ask; True when they are on.

    A tracer provider already set for the process (``opentelemetry-instrument``, or an
    application embedding the worker) is used as it is. Otherwise one is made with the
    SDK's own reading of ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*`` and the exporters' variables
    (``OTEL_EXPORTER_OTLP_*``), one batch processor per exporter, set as the global one."""
    names = wanted(environ)
    if not names:
        return False
    try:
        from opentelemetry import trace  # noqa: PLC0415 - optional
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    except ImportError:
        log.warning(
            "tracing asked for (exporters: %s) but the otel extra is not installed "
            "(pip install 'cancel-worker[otel]'); running without traces",
            ",".join(names),
        )
        return False
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        enable(current)
        log.info("tracing on, with the process's tracer provider")
        return True
    exporters = []
    for name in names:
        try:
            exporters.append(_exporter(name, environ))
        except Exception as exc:  # noqa: BLE001 - tracing never stops the worker
            log.warning("span exporter %r not set up (%s); left out", name, exc)
    if not exporters:
        log.warning("no span exporter could be set up; running without traces")
        return False
    attributes: dict[str, str] = {}
    if "OTEL_SERVICE_NAME" not in environ and "service.name=" not in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = INSTRUMENTATION_NAME
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    global _owned  # noqa: PLW0603 - the process's one provider
    _owned = provider
    enable(provider)
    log.info("tracing on, exporting spans to %s", ",".join(names))
    return True


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    """A span exporter by its ``OTEL_TRACES_EXPORTER`` name (the SDK's entry points)."""
    if name == "console":
        # One span a line (the SDK's default is indented JSON over many lines).
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    found = importlib.metadata.entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise LookupError(f"no exporter {name!r} installed")
    return next(iter(found)).load()()


def enable(provider: Any = None) -> None:
    """Record the worker's spans with ``provider`` (default: the global one)."""
    global ON, _tracer, _otel  # noqa: PLW0603 - the switch the hot path reads
    api = _api()
    if api is None:
        raise RuntimeError("the otel extra is not installed")
    source = provider if provider is not None else api.get_tracer_provider()
    _otel = _otel or _Otel()
    _tracer = source.get_tracer(INSTRUMENTATION_NAME, _version())
    ON = True


def disable() -> None:
    """Stop recording the worker's spans."""
    global ON, _tracer  # noqa: PLW0603
    ON = False
    _tracer = None


def shutdown() -> None:
    """Export what is buffered and stop (the provider :func:`configure` made, if any)."""
    global _owned  # noqa: PLW0603
    disable()
    if _owned is not None:
        _owned.shutdown()
        _owned = None


def _version() -> str:
    try:
        return importlib.metadata.version("cancel-worker")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "0"


# -- the worker's spans (call only when ON) ----------------------------------------------------


def _enabled() -> tuple[Tracer, _Otel]:
    if _tracer is None or _otel is None:
        raise RuntimeError("tracing is off: check tracing.ON first")
    return _tracer, _otel


def _extract(headers: Sequence[Header]) -> Any:
    """The context of a record's W3C headers (the first of each), or an empty context."""
    _, otel = _enabled()
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name in TRACE_HEADERS and value is not None and name not in carrier:
            carrier[name] = value.decode("latin-1")
    if TRACEPARENT not in carrier:
        return otel.Context()
    return otel.propagator.extract(carrier, otel.Context())


def _text(raw: bytes | None, limit: int = 256) -> str | None:
    """A key as the messaging conventions want it: its text, if it is short UTF-8."""
    if raw is None or len(raw) > limit:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


@contextlib.contextmanager
def process_span(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[Header],
    group: str | None,
) -> Iterator[SpanLike]:
    """The command's span, child of the record's ``traceparent`` (if any)."""
    tracer, otel = _enabled()
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
        "messaging.message.body.size": len(value) if value is not None else 0,
    }
    text = _text(key)
    if text is not None:
        attributes["messaging.kafka.message.key"] = text
    if value is None:
        attributes["messaging.kafka.message.tombstone"] = True
    if group:
        attributes["messaging.consumer.group.name"] = group
    token = _ATTEMPTS.set({})
    try:
        with tracer.start_as_current_span(
            f"process {topic}",
            context=_extract(headers),
            kind=otel.SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span
    finally:
        _ATTEMPTS.reset(token)


def span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """An internal span under the current one, or :data:`NOOP` when tracing is off.
    An exception leaving it marks it failed with ``error.type`` (its message and trace
    are not recorded: a library's message may quote a URL)."""
    if not ON:
        return NOOP
    return _internal(name, attributes)


@contextlib.contextmanager
def _internal(name: str, attributes: Mapping[str, Any] | None) -> Iterator[SpanLike]:
    tracer, _ = _enabled()
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            _failed(current, type(exc).__name__, None)
            raise


def _failed(current: Any, error_type: str, description: str | None) -> None:
    _, otel = _enabled()
    current.set_attribute(ERROR_TYPE, error_type)
    current.set_status(otel.Status(otel.StatusCode.ERROR, description))


@contextlib.contextmanager
def http_attempt(
    method: str, path: str, query: str, route: str, scheme: str, host: str, port: int | None
) -> Iterator[SpanLike]:
    """One HTTP attempt to the exchange. ``path`` is the route's path, without a query;
    ``query`` (the request's parameters, unsigned) only tells a repeat of the same request
    (its attempt number) and is not recorded."""
    tracer, otel = _enabled()
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.template": path,
        "url.scheme": scheme,
        "server.address": host,
        ROUTE: route,
    }
    if port is not None:
        attributes["server.port"] = port
    attempts = _ATTEMPTS.get()
    if attempts is not None:
        request = (method, path, query)
        number = attempts[request] = attempts.get(request, 0) + 1
        attributes[ATTEMPT] = number
        if number > 1:
            attributes["http.request.resend_count"] = number - 1
    with tracer.start_as_current_span(
        f"{method} {path}",
        kind=otel.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        yield current


def http_answered(current: SpanLike, status: int) -> None:
    current.set_attribute("http.response.status_code", status)


def http_failed(current: SpanLike, status: int | None, code: int | None, error: str) -> None:
    """An attempt that ended in an error: the exchange's (``status``, ``code``), or none
    (``error``: the error's class, e.g. ``NoAnswerError``)."""
    if status is not None:
        current.set_attribute("http.response.status_code", status)
    if code is not None:
        current.set_attribute(BINANCE_CODE, code)
    _failed(current, str(status) if status is not None else error, error)


def result_headers(
    topic: str, key: bytes | None, event: Mapping[str, object]
) -> tuple[Header, ...]:
    """Say the result on the command's span, and record the result record's creation: its
    span's context, as ``traceparent`` (and ``tracestate``), for the record's headers."""
    tracer, otel = _enabled()
    command = otel.get_current_span()
    for name, field in ((COMMAND_ID, "command_id"), (ACCOUNT, "account"), (RESULT_TYPE, "type")):
        value = event.get(field)
        if isinstance(value, str):
            command.set_attribute(name, value)
    reason = event.get("reason")
    if isinstance(reason, str):
        command.set_attribute(RESULT_REASON, reason)
        command.set_attribute(ERROR_TYPE, reason)
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.name": "create",
        "messaging.operation.type": "create",
        "messaging.destination.name": topic,
    }
    text = _text(key)
    if text is not None:
        attributes["messaging.kafka.message.key"] = text
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span(
        f"create {topic}", kind=otel.SpanKind.PRODUCER, attributes=attributes
    ):
        otel.propagator.inject(carrier)
    out: list[Header] = []
    parent = carrier.get(TRACEPARENT)
    if parent is not None:
        out.append((TRACEPARENT, parent.encode("ascii")))
        state = carrier.get(TRACESTATE)
        if state and len(state) <= TRACESTATE_MAX_BYTES:
            out.append((TRACESTATE, state.encode("ascii", "replace")))
    return tuple(out)


# -- the client library's spans (the application's tracer provider) ----------------------------


def _client_tracer() -> Tracer | None:
    if _tracer is not None:
        return _tracer
    api = _api()
    if api is None:
        return None
    tracer: Tracer = api.get_tracer(INSTRUMENTATION_NAME, _version())
    return tracer


def client_span(name: str, attributes: Mapping[str, Any]) -> Any:
    """A CLIENT span for a request/reply round trip (NOOP without the extra). Without a
    tracer provider set by the application it records nothing."""
    tracer = _client_tracer()
    if tracer is None:
        return NOOP
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    return tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes)


@contextlib.contextmanager
def client_send(topic: str, key: bytes) -> Iterator[list[tuple[str, bytes]]]:
    """While a command is published: its ``send`` span (PRODUCER) and the headers carrying
    it, when a trace is active; no span and no headers otherwise."""
    api = _api()
    if api is None or not api.get_current_span().get_span_context().is_valid:
        yield []
        return
    from opentelemetry.trace import SpanKind  # noqa: PLC0415
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    tracer = _client_tracer()
    assert tracer is not None  # noqa: S101 - the API is there
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "messaging.destination.name": topic,
    }
    text = _text(key)
    if text is not None:
        attributes["messaging.kafka.message.key"] = text
    with tracer.start_as_current_span(
        f"send {topic}", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield [(name, carrier[name].encode("ascii")) for name in TRACE_HEADERS if name in carrier]


def trace_id_of(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """The trace id (32 hex digits) of a record's ``traceparent``, if it has a valid one."""
    for name, value in headers:
        if name == TRACEPARENT and value is not None:
            parts = value.decode("latin-1").split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1]
            return None
    return None


__all__ = [
    "NOOP",
    "ON",
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_HEADERS",
    "available",
    "client_send",
    "client_span",
    "configure",
    "disable",
    "enable",
    "http_attempt",
    "process_span",
    "result_headers",
    "shutdown",
    "span",
    "trace_id_of",
    "wanted",
]
