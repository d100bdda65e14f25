"""schemas/asyncapi.yaml: valid for the AsyncAPI parser, and equal to what the code produces
and reads (topics, partitions, group and client ids, keys, header names, the JSON Schemas
its messages reference, and its examples)."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import orjson
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from worker import processor, producers, tracing
from worker.cli import replay
from worker.cli.checkup import run_checks, wanted_topics
from worker.client import DEFAULT_COMMANDS_TOPIC, DEFAULT_RESULTS_TOPIC, key_of
from worker.core import events, redrive
from worker.core.contracts import (
    COMMAND_SCHEMA,
    RESULT_SCHEMA,
    command_validator,
    result_validator,
)
from worker.executor import CancelExecutor
from worker.kafka.io import make_consumer, make_producer
from worker.kafka.pipeline import InRecord, OutRecord
from worker.processor import CommandProcessor
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "schemas"
DOCUMENT = SCHEMAS / "asyncapi.yaml"
TOOLS = ROOT / "tools" / "asyncapi"
ASYNCAPI = TOOLS / "node_modules" / ".bin" / "asyncapi"
STRIMZI_TOPICS = ROOT / "deploy" / "k8s" / "components" / "kafka-topics" / "kafka-topics.yaml"

# The W3C Trace Context headers the worker reads on commands and writes on results.
TRACE_HEADERS = set(tracing.TRACE_HEADERS)
# The documented examples' signing key: the Ed25519 key whose seed is 32 zero bytes.
EXAMPLE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(32))


def load(path: Path = DOCUMENT) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    return document


def pointer(document: Any, ref: str) -> Any:
    """What a local ``#/a/b`` reference names."""
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(document: dict[str, Any], node: Any) -> Any:
    """``node`` with its local references followed (one level at a time, recursively)."""
    while isinstance(node, dict) and set(node) == {"$ref"} and node["$ref"].startswith("#/"):
        node = pointer(document, node["$ref"])
    return node


def file_ref(node: Any) -> Path:
    """The file a relative ``$ref`` names, relative to the document."""
    assert isinstance(node, dict) and set(node) == {"$ref"}, node
    ref = node["$ref"]
    assert not ref.startswith(("#", "http:", "https:")), ref
    return (DOCUMENT.parent / ref).resolve()


def resolved(document: dict[str, Any], node: Any) -> Any:
    """``node`` with every local reference in it replaced by what it names."""
    node = deref(document, node)
    if isinstance(node, dict):
        return {k: resolved(document, v) for k, v in node.items()}
    if isinstance(node, list):
        return [resolved(document, v) for v in node]
    return node


def message(document: dict[str, Any], channel: str) -> dict[str, Any]:
    messages = document["channels"][channel]["messages"]
    assert len(messages) == 1, f"{channel}: one message expected, got {sorted(messages)}"
    found = deref(document, next(iter(messages.values())))
    assert isinstance(found, dict)
    return found


def headers_schema(document: dict[str, Any], channel: str) -> dict[str, Any]:
    schema = resolved(document, message(document, channel)["headers"])
    assert isinstance(schema, dict)
    return schema


def header_names(document: dict[str, Any], channel: str) -> set[str]:
    return set(headers_schema(document, channel)["properties"])


CHANNELS = {  # channel -> the setting that names its topic
    "commands": "commands_topic",
    "results": "results_topic",
    "deadletter": "deadletter_topic",
}


# -- the parser ---------------------------------------------------------------------------------


def run_asyncapi(path: Path) -> subprocess.CompletedProcess[str]:
    assert ASYNCAPI.exists(), f"{ASYNCAPI} is missing: run `make asyncapi-tools`"
    env = {
        **os.environ,
        # No usage reporting (the CLI's own switch, read from this file), no config warnings.
        "ASYNCAPI_METRICS_CONFIG_PATH": str(TOOLS / "analytics.json"),
        "SUPPRESS_NO_CONFIG_WARNING": "1",
    }
    return subprocess.run(
        [str(ASYNCAPI), "validate", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def problems(output: str) -> tuple[int, int]:
    """Errors and warnings counted by the CLI's closing lines (0, 0 when none are printed)."""
    errors = warnings = 0
    for found in re.finditer(r"\((\d+) errors?, (\d+) warnings?", output):
        errors += int(found[1])
        warnings += int(found[2])
    return errors, warnings


def test_the_asyncapi_parser_validates_the_document() -> None:
    done = run_asyncapi(DOCUMENT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"File {DOCUMENT} is valid" in done.stdout, done.stdout
    assert problems(done.stdout) == (0, 0), done.stdout


def test_the_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    """The validation can fail: an operation without its channel, a payload schema file that
    is not there."""
    text = DOCUMENT.read_text()
    cases = {
        "no-channel.yaml": text.replace("    channel:\n      $ref: '#/channels/results'\n", "", 1),
        "missing-schema.yaml": text.replace("./result-event.schema.json", "./nope.json", 1),
    }
    copy = tmp_path / "schemas"  # the document's relative references resolve in the copy
    shutil.copytree(SCHEMAS, copy)
    for name, broken in cases.items():
        assert broken != text, name
        (copy / name).write_text(broken)
        done = run_asyncapi(copy / name)
        assert done.returncode != 0, f"{name}: {done.stdout}"
        assert problems(done.stdout)[0] >= 1, f"{name}: {done.stdout}"


# -- topics, partitions, ids --------------------------------------------------------------------


def test_references_stand_alone() -> None:
    """A ``$ref`` with siblings: AsyncAPI's schemas (JSON Schema draft-07) ignore them."""

    def walk(node: Any, where: str) -> Iterator[str]:
        if isinstance(node, dict):
            if "$ref" in node and len(node) > 1:
                yield where
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}/{i}")

    assert list(walk(load(), "#")) == []


def test_channels_are_the_worker_topics_at_their_defaults() -> None:
    document = load()
    assert set(document["channels"]) == set(CHANNELS)
    defaults = Settings()
    for channel, setting in CHANNELS.items():
        assert document["channels"][channel]["address"] == getattr(defaults, setting), channel
    # The client library's defaults are the worker's.
    assert document["channels"]["commands"]["address"] == DEFAULT_COMMANDS_TOPIC
    assert document["channels"]["results"]["address"] == DEFAULT_RESULTS_TOPIC


def test_partitions_and_replicas_are_those_the_kit_creates() -> None:
    document = load()
    default_partitions = inspect.signature(run_checks).parameters["partitions"].default
    created = wanted_topics(Settings(), default_partitions)  # `check --create-topics`
    strimzi = {
        item["metadata"]["name"]: item["spec"]
        for item in yaml.safe_load_all(STRIMZI_TOPICS.read_text())
    }
    for channel in CHANNELS:
        binding = document["channels"][channel]["bindings"]["kafka"]
        topic = document["channels"][channel]["address"]
        assert binding["partitions"] == created[topic] == strimzi[topic]["partitions"], channel
        assert binding["replicas"] == strimzi[topic]["replicas"], channel
        assert binding["topicConfiguration"] == strimzi[topic]["config"], channel


def test_group_and_client_ids_are_the_worker_clients() -> None:
    document = load()
    operations = document["operations"]

    async def clients() -> tuple[str, str, str]:
        consumer, producer = make_consumer(Settings()), make_producer(Settings())
        try:
            return consumer._group_id, consumer._client._client_id, producer.client._client_id
        finally:
            await consumer.stop()
            await producer.stop()

    group_id, consumer_id, producer_id = asyncio.run(clients())
    receive = operations["receiveCommand"]
    assert receive["action"] == "receive"
    assert deref(document, receive["channel"]) is document["channels"]["commands"]
    assert deref(document, receive["reply"]["channel"]) is document["channels"]["results"]
    assert receive["bindings"]["kafka"]["groupId"]["default"] == group_id
    assert receive["bindings"]["kafka"]["clientId"]["default"] == consumer_id
    for name, channel in (("sendResult", "results"), ("sendDeadLetter", "deadletter")):
        assert operations[name]["action"] == "send"
        assert deref(document, operations[name]["channel"]) is document["channels"][channel]
        assert operations[name]["bindings"]["kafka"]["clientId"]["default"] == producer_id


# -- headers ------------------------------------------------------------------------------------


def test_command_headers_are_those_the_code_writes_and_reads() -> None:
    document = load()
    schema = headers_schema(document, "commands")
    written_and_read = {
        producers.PRODUCER_HEADER,
        producers.SIGNATURE_HEADER,
        replay.REPLAYED_FROM,
        replay.REPLAYED_AT,
        redrive.REDRIVE_OF,
        redrive.REDRIVE_REASON,
    }
    assert set(schema["properties"]) == written_and_read | TRACE_HEADERS
    assert set(schema["required"]) == {producers.PRODUCER_HEADER, producers.SIGNATURE_HEADER}
    properties = schema["properties"]
    assert properties[producers.PRODUCER_HEADER]["pattern"] == f"^{producers.PRODUCER_ID.pattern}$"
    assert set(properties[redrive.REDRIVE_REASON]["enum"]) == set(redrive.REDRIVABLE)
    # What the producer side writes passes the documented header schema.
    value = b'{"command_id": "c1"}'
    written = dict(producers.signed_headers("risk-engine-7", EXAMPLE_KEY, value))
    jsonschema.validate({k: v.decode() for k, v in written.items()}, schema)


def test_result_headers_are_those_the_processor_writes() -> None:
    document = load()
    schema = headers_schema(document, "results")
    assert set(schema["properties"]) == {processor.TYPE_HEADER} | TRACE_HEADERS
    assert schema["required"] == [processor.TYPE_HEADER]
    event_types = {events.CANCELED, events.SWEPT, events.FAILED, events.DUPLICATE}
    assert set(schema["properties"][processor.TYPE_HEADER]["enum"]) == event_types
    schema_types = {
        definition["properties"]["type"]["const"]
        for definition in orjson.loads((SCHEMAS / RESULT_SCHEMA).read_bytes())["$defs"].values()
        if "const" in definition.get("properties", {}).get("type", {})
    }
    assert schema_types == event_types


def _deadletter(
    value: bytes | None, key: bytes, headers: tuple[tuple[str, bytes], ...]
) -> OutRecord:
    """The dead-letter copy the processor makes of an invalid command record."""
    worker = CommandProcessor(
        cast(CancelExecutor, None),  # never asked: an invalid command sends nothing
        results_topic=Settings.results_topic,
        deadletter_topic=Settings.deadletter_topic,
        max_command_bytes=65_536,
        deadletter_max_bytes=8192,
        clock=lambda: 1_795_260_543_140,
    )
    record = InRecord(Settings.commands_topic, 2, 1842, key, value, headers)
    out = asyncio.run(worker(record))
    dead = [r for r in out if r.topic == Settings.deadletter_topic]
    assert len(dead) == 1, out
    return dead[0]


def test_deadletter_headers_are_those_the_processor_writes() -> None:
    """Run the processor: a plain invalid record gets the required headers; an oversize key,
    value and header set get the optional ones too. Together: the documented set."""
    document = load()
    schema = headers_schema(document, "deadletter")
    plain = _deadletter(b"{}", b"desk-a:BTCUSDT", ())
    always = {name for name, _ in plain.headers}
    oversize = _deadletter(
        b"x" * 20_000, b"k" * (processor.MAX_KEY_BYTES + 1), (("big", b"h" * 8000),)
    )
    every = {name for name, _ in oversize.headers} - {"big"}
    assert set(schema["required"]) == always
    assert set(schema["properties"]) == every == set(processor.DEADLETTER_HEADERS)
    for copy in (plain, oversize):
        own = {name: (value or b"").decode() for name, value in copy.headers if name != "big"}
        jsonschema.validate(own, schema)
    # A record's own headers travel with it (the schema must let them through).
    assert schema["additionalProperties"] is True


# -- payloads, keys, examples -------------------------------------------------------------------


def test_payloads_reference_the_json_schemas() -> None:
    document = load()
    expected = {"commands": COMMAND_SCHEMA, "results": RESULT_SCHEMA}
    for channel, schema_file in expected.items():
        payload = message(document, channel)["payload"]
        assert payload["schemaFormat"] == "application/schema+json;version=draft-07"
        assert file_ref(payload["schema"]) == (SCHEMAS / schema_file).resolve(), channel
    # Dead letters are the refused bytes, whatever they are: no schema to hold them to.
    assert set(message(document, "deadletter")["payload"]) == {"description"}
    for channel in CHANNELS:
        found = message(document, channel)
        correlation = deref(document, found.get("correlationId", {}))
        if channel != "deadletter":
            assert correlation["location"] == "$message.payload#/command_id"


def examples(channel: str) -> Iterator[tuple[str, dict[str, str], Path]]:
    document = load()
    for example in message(document, channel)["examples"]:
        yield example["name"], example["headers"], file_ref(example["payload"])


def test_command_examples_are_valid_signed_schema_examples() -> None:
    document = load()
    schema = headers_schema(document, "commands")
    key_pattern = re.compile(
        resolved(document, message(document, "commands")["bindings"])["kafka"]["key"]["pattern"]
    )
    seen = 0
    for name, headers, path in examples("commands"):
        assert path.parent == SCHEMAS / "examples" / "command" / "valid", name
        assert name.startswith(path.stem), name
        raw = path.read_bytes()
        command_validator().validate(orjson.loads(raw))
        jsonschema.validate(headers, schema)
        # A real signature over the example file's exact bytes.
        assert headers[producers.SIGNATURE_HEADER].encode() == producers.sign(EXAMPLE_KEY, raw)
        command = orjson.loads(raw)
        if "symbol" in command:  # the client's key (an algo cancel may leave its symbol out)
            assert key_pattern.fullmatch(key_of(command).decode()), name
        seen += 1
    assert seen >= 3


def test_result_examples_are_valid_schema_examples() -> None:
    document = load()
    schema = headers_schema(document, "results")
    seen: set[str] = set()
    for name, headers, path in examples("results"):
        assert path.parent == SCHEMAS / "examples" / "result" / "valid", name
        assert path.stem == name, name
        event = orjson.loads(path.read_bytes())
        result_validator().validate(event)
        jsonschema.validate(headers, schema)
        assert headers[processor.TYPE_HEADER] == event["type"], name
        seen.add(event["type"])
    assert seen == set(schema["properties"][processor.TYPE_HEADER]["enum"])


def test_deadletter_example_is_what_the_processor_writes() -> None:
    document = load()
    (name, headers, path), *more = list(examples("deadletter"))
    assert not more
    assert path.parent == SCHEMAS / "examples" / "command" / "invalid", name
    raw = path.read_bytes()
    signature = producers.sign(EXAMPLE_KEY, raw)
    own = ((producers.PRODUCER_HEADER, b"risk-engine-7"), (producers.SIGNATURE_HEADER, signature))
    copy = _deadletter(raw, b"desk-a:BTCUSDT", own)
    assert copy.value == raw
    assert headers == {k: (v or b"").decode() for k, v in copy.headers}
    jsonschema.validate(headers, headers_schema(document, "deadletter"))
