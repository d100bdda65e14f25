"""Kafka TLS and SASL: every Kafka client the product builds from settings gets the same
options, built in one place (``worker.kafka.io.security_options``).

(a) A scan of ``worker/``'s code: every ``AIOKafkaConsumer``/``AIOKafkaProducer``/
``AIOKafkaAdminClient`` is built with ``**security_options(...)``, or inside a function that
passes its caller's options through — and then every call of that function is held to the
same rule, up to a call that passes ``security_options``. A new client without the options
fails here. (b) The options themselves: a CA, a client certificate and an encrypted key made
here load into an ``ssl.SSLContext`` that verifies the server and its host name and presents
the client certificate (a TLS handshake on loopback proves it); SASL comes out as aiokafka
takes it; what cannot be loaded is a one-line configuration error, never a traceback, and no
secret is ever shown.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import ssl
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

import worker
from tests.support import run_cli
from tests.tls_material import TlsFiles, write_tls_material
from worker.client import CancelClient, CommandProducer, ResultConsumer
from worker.kafka.fencing import GroupMember
from worker.kafka.io import (
    TransactionalSink,
    make_consumer,
    make_producer,
    security_options,
)
from worker.kafka.topic_reader import ResultsReader, reader_consumer
from worker.settings import ENV_PREFIX, Settings, SettingsError, load_settings

PACKAGE = Path(worker.__file__).parent
ROOT = PACKAGE.parent
W = ENV_PREFIX
SECRET = "s3cr3t-never-shown"

# -- (a) no Kafka client without the options -------------------------------------------------

CONSTRUCTORS = frozenset({"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"})
# Files whose Kafka clients are not built from settings, and why.
EXEMPT = {
    "tools/demo.py": "the demo starts its own PLAINTEXT broker on loopback and names it",
    "tools/dev.py": "the local stack starts its own PLAINTEXT broker on loopback and names it",
}


@dataclass(frozen=True)
class Site:
    """One call that makes a Kafka client, directly or through a pass-through function."""

    path: str
    line: int
    callee: str
    covered: bool  # passes **security_options(...)
    passes_through: str | None  # else: the function whose caller's options it passes on

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.callee}(...)"


@dataclass
class Scan:
    sites: list[Site] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    makers: set[str] = field(default_factory=set)  # constructors and pass-through functions


def _callee(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _calls_security_options(expr: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Call) and _callee(node) == "security_options"
        for node in ast.walk(expr)
    )


class _Scope(ast.NodeVisitor):
    """For every call: the function and class it is in, that function's ``**`` parameter and
    the ``self`` attributes of the class that hold one (``self._kafka = kafka``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[ast.Call, ast.FunctionDef | ast.AsyncFunctionDef | None, str]] = []
        self.held: dict[str, set[str]] = {}  # class -> attributes holding ** options
        self._function: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self._class: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._class.append(node.name)
        held = self.held.setdefault(node.name, set())
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.args.kwarg is not None:
                kwarg = item.args.kwarg.arg
                for sub in ast.walk(item):
                    if (
                        isinstance(sub, ast.Assign)
                        and isinstance(sub.value, ast.Name)
                        and sub.value.id == kwarg
                    ):
                        held.update(
                            t.attr
                            for t in sub.targets
                            if isinstance(t, ast.Attribute)
                            and isinstance(t.value, ast.Name)
                            and t.value.id == "self"
                        )
        self.generic_visit(node)
        self._class.pop()

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._function.append(node)
        self.generic_visit(node)
        self._function.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = self._function[-1] if self._function else None
        self.calls.append((node, function, self._class[-1] if self._class else ""))
        self.generic_visit(node)


def _annotations(tree: ast.AST) -> set[int]:
    """ids of every node inside a type annotation."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        roots: list[ast.AST | None] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            every = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            every += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
            roots += [a.annotation for a in every] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
        for root in roots:
            if root is not None:
                inside.update(id(n) for n in ast.walk(root))
    return inside


def scan(sources: Mapping[str, str]) -> Scan:
    """Every place in ``sources`` (relative path → code) that makes a Kafka client."""
    result = Scan(makers=set(CONSTRUCTORS))
    parsed = {path: ast.parse(code) for path, code in sources.items()}
    scopes: dict[str, _Scope] = {}
    for path, tree in parsed.items():
        scopes[path] = scope = _Scope()
        scope.visit(tree)
        called = {id(call.func) for call, _, _ in scope.calls}
        in_annotations = _annotations(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name in CONSTRUCTORS and alias.asname not in (None, alias.name):
                        result.problems.append(f"{path}:{node.lineno}: {alias.name} renamed")
            name = (
                node.id
                if isinstance(node, ast.Name)
                else node.attr
                if isinstance(node, ast.Attribute)
                else None
            )
            if name in CONSTRUCTORS and id(node) not in called and id(node) not in in_annotations:
                line = getattr(node, "lineno", 0)
                result.problems.append(
                    f"{path}:{line}: {name} passed around instead of called: "
                    "a client made elsewhere cannot be checked"
                )
    while True:  # until no new pass-through function turns up
        result.sites = []
        found = set(result.makers)
        for path, scope in scopes.items():
            for call, function, class_name in scope.calls:
                callee = _callee(call)
                if callee not in result.makers:
                    continue
                stars = [kw.value for kw in call.keywords if kw.arg is None]
                covered = any(_calls_security_options(star) for star in stars)
                through: str | None = None
                if not covered and function is not None:
                    kwarg = function.args.kwarg.arg if function.args.kwarg else None
                    held = scope.held.get(class_name, set())
                    for star in stars:
                        if isinstance(star, ast.Name) and star.id == kwarg:
                            through = class_name if function.name == "__init__" else function.name
                        elif (
                            isinstance(star, ast.Attribute)
                            and isinstance(star.value, ast.Name)
                            and star.value.id == "self"
                            and star.attr in held
                        ):
                            through = class_name
                if through is not None:
                    found.add(through)
                result.sites.append(Site(path, call.lineno, callee, covered, through))
        if found == result.makers:
            break
        result.makers = found
    for path, scope in scopes.items():
        for call, _, _ in scope.calls:
            if any(kw.arg == "bootstrap_servers" for kw in call.keywords) and (
                _callee(call) not in result.makers
            ):
                result.problems.append(
                    f"{path}:{call.lineno}: {_callee(call)}(bootstrap_servers=...) is not a "
                    "known Kafka client"
                )
    for site in result.sites:
        if not site.covered and site.passes_through is None and site.path not in EXEMPT:
            result.problems.append(
                f"{site}: a Kafka client without **security_options(settings) "
                "(or a ** pass-through of its caller's options)"
            )
    return result


def _package_sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text("utf-8")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_kafka_client_in_the_package_gets_the_security_options() -> None:
    result = scan(_package_sources())
    assert result.problems == []
    direct = {(s.path, s.callee) for s in result.sites if s.callee in CONSTRUCTORS}
    # The scan still sees what it is meant to see.
    assert len(direct) >= 8
    assert {
        "reader_consumer",
        "cluster_topics",
        "ResultsReader",
        "ensure_topics",
        "final_result_ids",
        "CommandProducer",
        "ResultConsumer",
        "CancelClient",
    } <= result.makers
    covered = {(s.path, s.callee) for s in result.sites if s.covered}
    assert {
        ("kafka/io.py", "AIOKafkaProducer"),  # make_producer: worker, send, replay, transactions
        ("kafka/io.py", "AIOKafkaConsumer"),  # make_consumer: the worker's group member
        ("kafka/io.py", "AIOKafkaAdminClient"),  # wait_for_kafka
        ("kafka/dedup.py", "ResultsReader"),  # the duplicate window's results reader
        ("cli/replay.py", "reader_consumer"),
        ("cli/replay.py", "cluster_topics"),
        ("cli/replay.py", "final_results"),
    } <= covered
    for path in EXEMPT:  # an exemption that no longer exempts anything goes
        assert any(s.path == path for s in result.sites), path


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        (
            "from aiokafka import AIOKafkaProducer\n"
            "def f(settings):\n"
            "    return AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)\n",
            "a Kafka client without **security_options",
        ),
        (
            "from aiokafka import AIOKafkaConsumer\n"
            "def reader(bootstrap, **kafka):\n"
            "    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka)\n"
            "def use(settings):\n"
            "    return reader(settings.bootstrap_servers)\n",
            "x.py:5: reader(...): a Kafka client without",
        ),
        (
            "from aiokafka.admin import AIOKafkaAdminClient\n"
            "class Reader:\n"
            "    def __init__(self, bootstrap, **kafka):\n"
            "        self._kafka = kafka\n"
            "    async def start(self):\n"
            "        return AIOKafkaAdminClient(bootstrap_servers='b', **self._kafka)\n"
            "def use(settings):\n"
            "    return Reader(settings.bootstrap_servers, client_id='x')\n",
            "x.py:8: Reader(...): a Kafka client without",
        ),
        (
            "import functools\nfrom aiokafka import AIOKafkaProducer\n"
            "make = functools.partial(AIOKafkaProducer, bootstrap_servers='b')\n",
            "AIOKafkaProducer passed around instead of called",
        ),
        (
            "from aiokafka import AIOKafkaProducer as P\n",
            "AIOKafkaProducer renamed",
        ),
        (
            "from somewhere import OtherClient\n"
            "def f(settings):\n"
            "    return OtherClient(bootstrap_servers=settings.bootstrap_servers)\n",
            "OtherClient(bootstrap_servers=...) is not a known Kafka client",
        ),
    ],
    ids=["direct", "pass-through-not-passed", "held-in-self", "partial", "alias", "bare-bootstrap"],
)
def test_the_scan_catches_a_client_without_the_options(code: str, problem: str) -> None:
    result = scan({"x.py": code})
    assert any(problem in p for p in result.problems), result.problems


def test_the_scan_accepts_the_ways_the_options_are_passed() -> None:
    code = (
        "from aiokafka import AIOKafkaConsumer\n"
        "from worker.kafka.io import security_options\n"
        "def reader(bootstrap, **kafka) -> AIOKafkaConsumer:\n"
        "    return AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka)\n"
        "def use(settings, **extra):\n"
        "    reader(settings.bootstrap_servers, **(security_options(settings) | extra))\n"
        "    return reader(settings.bootstrap_servers, **security_options(settings))\n"
    )
    assert scan({"x.py": code}).problems == []


# -- (b) the options ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return write_tls_material(tmp_path_factory.mktemp("tls"), password=SECRET)


def _tls_env(tls: TlsFiles, **more: str) -> dict[str, str]:
    env = {
        f"{W}KAFKA_SECURITY_PROTOCOL": "SSL",
        f"{W}KAFKA_SSL_CAFILE": str(tls.ca),
        f"{W}KAFKA_SSL_CERTFILE": str(tls.cert),
        f"{W}KAFKA_SSL_KEYFILE": str(tls.key),
        f"{W}KAFKA_SSL_KEY_PASSWORD": SECRET,
    }
    env.update({f"{W}{k.upper()}": v for k, v in more.items()})
    return env


def test_plaintext_needs_nothing() -> None:
    assert security_options(Settings()) == {"security_protocol": "PLAINTEXT"}


def test_ssl_settings_from_files_give_a_verifying_context(tls: TlsFiles) -> None:
    options = security_options(load_settings(_tls_env(tls)))
    assert set(options) == {"security_protocol", "ssl_context"}
    assert options["security_protocol"] == "SSL"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "cancel-worker test CA"),),)
    ]
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


async def _handshake(tls: TlsFiles, client: ssl.SSLContext, server_hostname: str) -> str:
    """A TLS handshake with a loopback server that requires a client certificate from the
    same CA; returns the client certificate's common name as the server saw it."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca))
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(dict(x[0] for x in peer["subject"])["commonName"])
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=server_hostname
        )
        assert await reader.read() == b"ok"
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return seen[0]


async def test_the_context_verifies_the_server_and_presents_the_client_certificate(
    tls: TlsFiles,
) -> None:
    context = security_options(load_settings(_tls_env(tls)))["ssl_context"]
    assert await _handshake(tls, context, tls.host) == "cancel-worker"
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await _handshake(tls, context, "broker.elsewhere.example")


async def test_a_context_without_the_ca_refuses_the_server(tls: TlsFiles) -> None:
    env = _tls_env(tls)
    del env[f"{W}KAFKA_SSL_CAFILE"]  # the system's CAs never signed the test CA's server
    context = security_options(load_settings(env))["ssl_context"]
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(tls, context, tls.host)


def test_the_key_may_sit_in_the_certificate_file(tmp_path: Path) -> None:
    files = write_tls_material(tmp_path, password=None)
    both = tmp_path / "both.pem"
    both.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
    settings = load_settings(
        {
            f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            f"{W}KAFKA_SSL_CAFILE": str(files.ca),
            f"{W}KAFKA_SSL_CERTFILE": str(both),
            f"{W}KAFKA_SASL_USERNAME": "u",
            f"{W}KAFKA_SASL_PASSWORD": SECRET,
        }
    )
    assert isinstance(security_options(settings)["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_options_are_what_aiokafka_takes(mechanism: str) -> None:
    settings = load_settings(
        {
            f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            f"{W}KAFKA_SASL_MECHANISM": mechanism,
            f"{W}KAFKA_SASL_USERNAME": "cancel-worker",
            f"{W}KAFKA_SASL_PASSWORD": SECRET,
        }
    )
    assert security_options(settings) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": "cancel-worker",
        "sasl_plain_password": SECRET,
    }


def test_sasl_ssl_has_both(tls: TlsFiles) -> None:
    env = _tls_env(tls, kafka_sasl_username="u", kafka_sasl_password="p")
    env[f"{W}KAFKA_SECURITY_PROTOCOL"] = "SASL_SSL"
    options = security_options(load_settings(env))
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "PLAIN"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("u", "p")
    assert isinstance(options["ssl_context"], ssl.SSLContext)


async def test_the_clients_built_from_settings_carry_the_options(tls: TlsFiles) -> None:
    env = _tls_env(tls, kafka_sasl_username="u", kafka_sasl_password=SECRET)
    env[f"{W}KAFKA_SECURITY_PROTOCOL"] = "SASL_SSL"
    env[f"{W}BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    settings = load_settings(env)
    context = security_options(settings)["ssl_context"]

    def carries(client: Any) -> None:
        # aiokafka's cluster client, what connects: .client of a producer, ._client else
        inner = client.client if isinstance(client, AIOKafkaProducer) else client._client
        assert inner._security_protocol == "SASL_SSL"
        assert inner._ssl_context is context
        assert inner._sasl_mechanism == "PLAIN"
        assert inner._sasl_plain_username == "u"
        assert inner._sasl_plain_password == SECRET

    producer = make_producer(settings)
    consumer = make_consumer(settings)
    transactional = TransactionalSink(settings, lambda: GroupMember(-1, ""))._factory("t-0")
    reader = ResultsReader(
        settings.bootstrap_servers, "r", client_id="x", **security_options(settings)
    )
    command_producer = CommandProducer.from_settings(settings)
    result_consumer = ResultConsumer.from_settings(settings)
    client = CancelClient.from_settings(settings, client_id="risk-7")
    assert client.producer.topic == settings.commands_topic
    try:
        for made in (producer, consumer, transactional, reader._consumer):
            carries(made)
        for made in (command_producer._producer, result_consumer._consumer):
            carries(made)
        carries(client.producer._producer)
        assert client.producer._producer.client._client_id == "risk-7"
    finally:
        for p in (producer, transactional, command_producer._producer):
            await p.stop()
        for c in (consumer, reader._consumer, result_consumer._consumer):
            await c.stop()
        await client.producer.stop()
        await client._results.stop()


async def test_pass_through_helpers_hand_the_options_on() -> None:
    sasl = {"sasl_plain_username": "u", "sasl_plain_password": "p"}
    consumer = reader_consumer("127.0.0.1:9", "x", 1000, security_protocol="SASL_PLAINTEXT", **sasl)
    try:
        assert isinstance(consumer, AIOKafkaConsumer)
        assert consumer._client._security_protocol == "SASL_PLAINTEXT"
    finally:
        await consumer.stop()


# -- what cannot be loaded, and secrets --------------------------------------------------------


def _problem(env: Mapping[str, str]) -> str:
    with pytest.raises(SettingsError) as info:
        security_options(load_settings(env))
    message = str(info.value)
    assert "\n" not in message
    assert SECRET not in message
    return message


def test_a_wrong_key_password_is_named(tls: TlsFiles) -> None:
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_KEY_PASSWORD"] = "not-" + SECRET
    assert _problem(env) == (
        f"{W}KAFKA_SSL_KEY_PASSWORD does not decrypt the private key in {tls.key} "
        f"({W}KAFKA_SSL_KEYFILE): wrong password"
    )


def test_an_encrypted_key_without_a_password_is_named(tls: TlsFiles) -> None:
    env = _tls_env(tls)
    del env[f"{W}KAFKA_SSL_KEY_PASSWORD"]
    assert _problem(env) == (
        f"{W}KAFKA_SSL_KEYFILE: the private key in {tls.key} is encrypted: "
        f"set {W}KAFKA_SSL_KEY_PASSWORD"
    )


def test_a_key_of_another_certificate_is_named(tls: TlsFiles) -> None:
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_KEYFILE"] = str(tls.other_key)
    message = _problem(env)
    assert message.startswith(f"{W}KAFKA_SSL_KEYFILE: the private key in {tls.other_key} ")
    assert "does not belong to the certificate" in message


def test_files_that_hold_no_pem_are_named(tls: TlsFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_CAFILE"] = str(junk)
    assert _problem(env) == (
        f"{W}KAFKA_SSL_CAFILE: cannot load the CA from {junk}: no PEM certificate in it"
    )
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_CERTFILE"] = str(junk)
    assert _problem(env) == f"{W}KAFKA_SSL_CERTFILE: no PEM certificate in {junk}"
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_KEYFILE"] = str(junk)
    assert _problem(env) == f"{W}KAFKA_SSL_KEYFILE: no PEM private key in {junk}"
    env = _tls_env(tls)
    del env[f"{W}KAFKA_SSL_KEYFILE"]
    del env[f"{W}KAFKA_SSL_KEY_PASSWORD"]
    assert _problem(env) == f"{W}KAFKA_SSL_CERTFILE: no PEM private key in {tls.cert}"


def test_a_missing_file_is_a_settings_error(tls: TlsFiles, tmp_path: Path) -> None:
    env = _tls_env(tls)
    env[f"{W}KAFKA_SSL_CAFILE"] = str(tmp_path / "nope.pem")
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert str(info.value) == (
        f"{W}KAFKA_SSL_CAFILE: cannot read {tmp_path / 'nope.pem'}: No such file or directory"
    )


def test_secrets_are_not_in_repr_or_messages(tls: TlsFiles) -> None:
    env = _tls_env(tls, kafka_sasl_username="u", kafka_sasl_password=SECRET)
    env[f"{W}KAFKA_SECURITY_PROTOCOL"] = "SASL_SSL"
    settings = load_settings(env)
    assert settings.kafka_sasl_password == SECRET == settings.kafka_ssl_key_password
    for shown in (repr(settings), str(settings), f"{settings}", f"{settings!r}"):
        assert SECRET not in shown
        assert "kafka_sasl_username='u'" in shown  # not a secret
    bad = [
        {f"{W}KAFKA_SASL_PASSWORD": SECRET},  # SASL setting without a SASL protocol
        {f"{W}KAFKA_SSL_KEY_PASSWORD": SECRET},  # TLS setting without a TLS protocol
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SSL", f"{W}KAFKA_SSL_KEY_PASSWORD": SECRET},
        {f"{W}KAFKA_SECURITY_PROTOCOL": "SASL_SSL", f"{W}KAFKA_SASL_PASSWORD": SECRET},
    ]
    for one in bad:
        with pytest.raises(SettingsError) as info:
            load_settings(one)
        assert SECRET not in str(info.value)
    with pytest.raises(SettingsError) as info:
        Settings(kafka_sasl_password=SECRET.encode()).check()  # type: ignore[arg-type]
    assert str(info.value) == f"{W}KAFKA_SASL_PASSWORD must be text: got a bytes"


# -- the CLI -----------------------------------------------------------------------------------


def _cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    # Nothing listens at this bootstrap: a configuration that passed would wait, not exit.
    return run_cli(*args, env={f"{W}BOOTSTRAP_SERVERS": "127.0.0.1:9", **env})


@pytest.fixture
def accounts_toml(tmp_path: Path) -> Path:
    path = tmp_path / "accounts.toml"
    path.write_text('[accounts.x]\napi_key = "k"\nsecret = "s"\n')
    return path


@pytest.mark.parametrize(
    "args", [("run",), ("send", "--json", "{}"), ("replay", "--dry-run")], ids=lambda a: a[0]
)
def test_the_cli_refuses_a_wrong_key_password_in_one_line(
    tls: TlsFiles, accounts_toml: Path, args: tuple[str, ...]
) -> None:
    env = _tls_env(tls, accounts_file=str(accounts_toml))
    env[f"{W}KAFKA_SSL_KEY_PASSWORD"] = "wrong-" + SECRET
    done = _cli(*args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "Traceback" not in output
    assert SECRET not in output
    assert done.stderr.strip().splitlines() == [
        f"configuration error: {W}KAFKA_SSL_KEY_PASSWORD does not decrypt the private key "
        f"in {tls.key} ({W}KAFKA_SSL_KEYFILE): wrong password"
    ]


def test_aiokafka_never_logs_below_warning_even_at_debug() -> None:
    """aiokafka logs the SASL exchange at DEBUG, and with PLAIN the password is in it: the
    worker's logging keeps aiokafka at WARNING whatever LOG_LEVEL says."""
    from worker.cli.main import configure_logging  # noqa: PLC0415

    root = logging.getLogger()
    kept = (root.level, root.handlers[:], logging.getLogger("aiokafka").level)
    try:
        configure_logging("DEBUG")
        assert logging.getLogger("aiokafka.conn").getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("aiokafka.conn").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(kept[0])
        root.handlers[:] = kept[1]
        logging.getLogger("aiokafka").setLevel(kept[2])
