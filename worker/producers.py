"""Who may write commands: signed commands and entitlements.

The producers file (``CANCEL_WORKER_PRODUCERS_FILE``, TOML) names every producer the worker
takes commands from, the Ed25519 public key(s) its commands are signed with, the accounts
it may name and whether it may send a kill switch::

    [producers.risk-engine-7]
    public_key_file = "/run/secrets/producers/risk-engine-7.pub"   # or public_key = "..."
    accounts = ["desk-a", "desk-b"]      # the account aliases it may name; ["*"]: every account
    kill_switch = false                  # may it send scope "symbol" (default false)

    [producers.ops-console]
    public_key = [                        # a list: each key is accepted (rotation)
        "-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----",
        "-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----",
    ]
    accounts = ["*"]
    kill_switch = true

``public_key`` and ``public_key_file`` may each be one value or a list (several keys are
accepted at once while a producer's key is rotated); relative paths are read from the
file's directory, so a Kubernetes Secret mounts as it is. The worker holds public keys
only: nothing it holds can forge a command. An unknown field or top-level table is refused
with a did-you-mean, as in the accounts file.

Every command record carries the headers ``x-producer`` (the producer id) and
``x-signature`` (standard padded base64 of the Ed25519 signature over the exact record
value bytes; a null value is signed as empty bytes). :meth:`Producers.verify` checks them,
:meth:`Producers.entitled` checks the account and the kill switch; each refusal has a
cause (:data:`CAUSES`) for the ``cancel_worker_unauthorized_total`` metric.

The producer side: :func:`load_private_key` and :func:`signed_headers` (the client
library, ``cancel-worker send``, ``replay``); :func:`generate` makes a key pair
(``cancel-worker keygen``).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.signing import VerifyKey

from worker.exchange.accounts import did_you_mean

PRODUCER_HEADER = "x-producer"
SIGNATURE_HEADER = "x-signature"
SIGNATURE_BYTES = 64
_SIGNATURE_B64_BYTES = 88  # base64 of 64 bytes, padded

TABLES = ("producers",)
FIELDS = ("public_key", "public_key_file", "accounts", "kill_switch")
EVERY_ACCOUNT = "*"
PRODUCER_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
UNKNOWN = "unknown"
"""The metric's producer label for a producer id that is not in the file (or no id)."""

# Why a command was refused as unauthorized (the metric's ``cause`` label).
MISSING_HEADER = "missing_header"  # no x-producer or no x-signature
MALFORMED_HEADER = "malformed_header"  # repeated, or not a producer id / padded base64
UNKNOWN_PRODUCER = "unknown_producer"
BAD_SIGNATURE = "bad_signature"
ACCOUNT_NOT_ENTITLED = "account_not_entitled"
KILL_SWITCH_NOT_ENTITLED = "kill_switch_not_entitled"
CAUSES = (
    MISSING_HEADER,
    MALFORMED_HEADER,
    UNKNOWN_PRODUCER,
    BAD_SIGNATURE,
    ACCOUNT_NOT_ENTITLED,
    KILL_SWITCH_NOT_ENTITLED,
)


class ProducersError(ValueError):
    """The producers file is missing, malformed or names a key that cannot be loaded."""


class ProducerKeyError(ValueError):
    """A producer's private key cannot be loaded (the message never shows key bytes)."""


def _unknown(what: str, name: str, known: Iterable[str]) -> ProducersError:
    return ProducersError(f"{what} {name!r}{did_you_mean(name, known)}")


@dataclass(frozen=True)
class Producer:
    """One producer: its id, the keys its signatures are checked with, what it may name."""

    id: str
    keys: tuple[Ed25519PublicKey, ...] = field(repr=False)
    accounts: frozenset[str] | None  # None: every account ("*")
    kill_switch: bool
    # The same keys for libsodium, which checks a signature in about 60 % of OpenSSL's time
    # (docs/development.md, Dependencies): one check per command record.
    _verifiers: tuple[VerifyKey, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_verifiers", tuple(VerifyKey(_raw(key)) for key in self.keys))

    def may_name(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts

    def describe(self) -> str:
        """What it may do, in a few words (``cancel-worker check``)."""
        named = "every account" if self.accounts is None else ", ".join(sorted(self.accounts))
        keys = f"{len(self.keys)} keys" if len(self.keys) > 1 else "1 key"
        kill = "kill switch allowed" if self.kill_switch else "no kill switch"
        return f"{keys}; may name {named}; {kill}"

    def signed(self, value: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is one of its keys' over ``value``."""
        if len(signature) != SIGNATURE_BYTES:
            return False  # libsodium raises on another length; it is no signature
        for key in self._verifiers:
            try:
                key.verify(value, signature)
            except BadSignatureError:
                continue
            return True
        return False


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a record is unauthorized: the metric's labels and the detail for the result."""

    producer: str  # a known producer id, or UNKNOWN
    cause: str
    detail: str
    verified: str | None = None  # the producer id, when its signature was good


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> list[bytes | None]:
    return [value for key, value in headers if key == name]


class Producers:
    """The producers of the file, and the checks the worker runs on every record."""

    def __init__(self, producers: Mapping[str, Producer]) -> None:
        self._producers = dict(producers)

    def __len__(self) -> int:
        return len(self._producers)

    def __iter__(self) -> Any:
        return iter(self._producers.values())

    def get(self, producer_id: str) -> Producer | None:
        return self._producers.get(producer_id)

    def verify(
        self, headers: Sequence[tuple[str, bytes | None]], value: bytes | None
    ) -> Producer | Refusal:
        """The producer whose signature ``value`` carries, or why it does not carry one."""
        ids = _header(headers, PRODUCER_HEADER)
        signatures = _header(headers, SIGNATURE_HEADER)
        if not ids or not signatures or ids[0] is None or signatures[0] is None:
            missing = [
                name
                for name, found in ((PRODUCER_HEADER, ids), (SIGNATURE_HEADER, signatures))
                if not found or found[0] is None
            ]
            return Refusal(UNKNOWN, MISSING_HEADER, f"unsigned command: no {' or '.join(missing)}")
        if len(ids) > 1 or len(signatures) > 1:
            return Refusal(
                UNKNOWN,
                MALFORMED_HEADER,
                f"{PRODUCER_HEADER} and {SIGNATURE_HEADER} must each appear once",
            )
        raw_id, raw_signature = ids[0], signatures[0]
        producer_id = raw_id.decode("ascii", "replace")
        if not PRODUCER_ID.fullmatch(producer_id):
            return Refusal(UNKNOWN, MALFORMED_HEADER, f"{PRODUCER_HEADER} is not a producer id")
        producer = self._producers.get(producer_id)
        if producer is None:
            return Refusal(UNKNOWN, UNKNOWN_PRODUCER, f"unknown producer {producer_id!r}")
        signature = _decode_signature(raw_signature)
        if signature is None:
            return Refusal(
                producer.id,
                MALFORMED_HEADER,
                f"{SIGNATURE_HEADER} is not the padded base64 of a 64-byte Ed25519 signature",
            )
        if not producer.signed(value if value is not None else b"", signature):
            return Refusal(
                producer.id,
                BAD_SIGNATURE,
                f"the signature does not match the command for producer {producer.id!r}",
            )
        return producer

    @staticmethod
    def entitled(producer: Producer, account: str, kill_switch: bool) -> Refusal | None:
        """Why ``producer`` may not send this command, or None when it may."""
        if not producer.may_name(account):
            return Refusal(
                producer.id,
                ACCOUNT_NOT_ENTITLED,
                f"producer {producer.id!r} may not name account {account!r}",
                verified=producer.id,
            )
        if kill_switch and not producer.kill_switch:
            return Refusal(
                producer.id,
                KILL_SWITCH_NOT_ENTITLED,
                f"producer {producer.id!r} may not send a kill switch (scope: symbol)",
                verified=producer.id,
            )
        return None


def _decode_signature(raw: bytes) -> bytes | None:
    if len(raw) != _SIGNATURE_B64_BYTES:
        return None
    try:
        signature = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(signature) != SIGNATURE_BYTES or base64.b64encode(signature) != raw:
        return None
    return signature


# -- the producers file ------------------------------------------------------------------------


def _strings(producer_id: str, name: str, raw: object) -> list[str]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ProducersError(
            f"producer {producer_id!r}: {name} must be a non-empty string or a list of them"
        )
    return [str(v) for v in values]


def _raw(key: Ed25519PublicKey) -> bytes:
    """The key's 32 bytes, as libsodium takes them."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public_key(producer_id: str, pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.strip())
    except (ValueError, TypeError) as exc:
        raise ProducersError(
            f"producer {producer_id!r}: {where} is not a PEM public key: {exc}"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ProducersError(f"producer {producer_id!r}: {where} must be an Ed25519 public key")
    try:
        # libsodium, which checks the signatures, refuses a key of small order or not in
        # canonical form: nothing would ever verify under it.
        crypto_sign_ed25519_pk_to_curve25519(_raw(key))
    except CryptoError:
        raise ProducersError(
            f"producer {producer_id!r}: {where} is not a usable Ed25519 public key (a point "
            "of small order or not in canonical form: no signature verifies under it)"
        ) from None
    return key


def parse_producer(producer_id: str, entry: object, base: Path) -> Producer:
    """One producer from its table; ``base`` resolves relative file paths."""
    if not PRODUCER_ID.fullmatch(producer_id):
        raise ProducersError(
            f"producer id {producer_id!r} must be 1 to 64 of A-Z a-z 0-9 . _ - "
            "(it is sent in the x-producer header)"
        )
    if not isinstance(entry, dict):
        raise ProducersError(f"producer {producer_id!r} must be a table")
    for name in entry:
        if name not in FIELDS:
            raise _unknown(f"producer {producer_id!r}: unknown field", name, FIELDS)
    keys: list[Ed25519PublicKey] = []
    if "public_key" in entry:
        for i, pem in enumerate(_strings(producer_id, "public_key", entry["public_key"])):
            keys.append(_public_key(producer_id, pem.encode(), f"public_key #{i + 1}"))
    if "public_key_file" in entry:
        for path_value in _strings(producer_id, "public_key_file", entry["public_key_file"]):
            path = (base / path_value).expanduser()
            try:
                content = path.read_bytes()
            except OSError as exc:
                raise ProducersError(
                    f"producer {producer_id!r}: cannot read public_key_file {path}: {exc.strerror}"
                ) from exc
            keys.append(_public_key(producer_id, content, f"public_key_file {path}"))
    if not keys:
        raise ProducersError(f"producer {producer_id!r}: public_key or public_key_file is required")
    if "accounts" not in entry:
        raise ProducersError(
            f'producer {producer_id!r}: accounts is required (the aliases it may name, or ["*"])'
        )
    accounts = entry["accounts"]
    if not isinstance(accounts, list) or not all(isinstance(a, str) and a for a in accounts):
        raise ProducersError(
            f"producer {producer_id!r}: accounts must be a list of account aliases"
        )
    if not accounts:
        raise ProducersError(
            f'producer {producer_id!r}: accounts is empty (name the aliases it may name, or ["*"])'
        )
    if EVERY_ACCOUNT in accounts and len(accounts) > 1:
        raise ProducersError(f'producer {producer_id!r}: "*" (every account) stands alone')
    kill_switch = entry.get("kill_switch", False)
    if not isinstance(kill_switch, bool):
        raise ProducersError(f"producer {producer_id!r}: kill_switch must be true or false")
    return Producer(
        producer_id,
        tuple(keys),
        None if accounts == [EVERY_ACCOUNT] else frozenset(accounts),
        kill_switch,
    )


def parse_producers(data: dict[str, Any], base: Path) -> Producers:
    for name in data:
        if name not in TABLES:
            raise _unknown("unknown top-level table or key", name, TABLES)
    tables = data.get("producers")
    if not isinstance(tables, dict) or not tables:
        raise ProducersError("no [producers.<id>] tables")
    return Producers({pid: parse_producer(pid, entry, base) for pid, entry in tables.items()})


def load_producers(path: Path) -> Producers:
    """Read and check the producers file; :class:`ProducersError` says what is wrong (one
    line, naming the file and the producer; never key bytes)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProducersError(f"cannot read producers file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProducersError(f"producers file {path} is not valid TOML: {exc}") from exc
    try:
        return parse_producers(data, path.parent)
    except ProducersError as exc:
        raise ProducersError(f"producers file {path}: {exc}") from None


# -- the producer side -------------------------------------------------------------------------


def load_private_key(key: Ed25519PrivateKey | str | os.PathLike[str]) -> Ed25519PrivateKey:
    """A producer's signing key: a key object, or the path of an unencrypted PKCS#8 PEM
    Ed25519 private key (``cancel-worker keygen`` writes one)."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    path = Path(key).expanduser()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ProducerKeyError(f"cannot read producer key {path}: {exc.strerror}") from None
    try:
        loaded = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ProducerKeyError(f"producer key {path} cannot be loaded: {exc}") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ProducerKeyError(f"producer key {path} must be an Ed25519 private key")
    return loaded


def sign(key: Ed25519PrivateKey, value: bytes | None) -> bytes:
    """The ``x-signature`` header value for ``value`` (standard padded base64)."""
    return base64.b64encode(key.sign(value if value is not None else b""))


def signed_headers(
    producer_id: str, key: Ed25519PrivateKey, value: bytes | None
) -> list[tuple[str, bytes]]:
    """The two headers a command record carries."""
    return [(PRODUCER_HEADER, producer_id.encode()), (SIGNATURE_HEADER, sign(key, value))]


def without_signature(
    headers: Iterable[tuple[str, bytes | None]],
) -> list[tuple[str, bytes | None]]:
    """``headers`` less any ``x-producer``/``x-signature`` (before signing anew)."""
    return [(k, v) for k, v in headers if k not in (PRODUCER_HEADER, SIGNATURE_HEADER)]


@dataclass(frozen=True)
class Signer:
    """A producer id and its private key: signs record values."""

    producer_id: str
    key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not PRODUCER_ID.fullmatch(self.producer_id):
            raise ProducerKeyError(
                f"producer id {self.producer_id!r} must be 1 to 64 of A-Z a-z 0-9 . _ -"
            )

    @classmethod
    def of(cls, producer_id: str, key: Ed25519PrivateKey | str | os.PathLike[str]) -> Signer:
        return cls(producer_id, load_private_key(key))

    def headers(self, value: bytes | None) -> list[tuple[str, bytes]]:
        return signed_headers(self.producer_id, self.key, value)


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def stanza(
    producer_id: str,
    key: Ed25519PrivateKey | Ed25519PublicKey,
    accounts: Sequence[str] = (),
    kill_switch: bool = False,
) -> str:
    """The ``[producers.<id>]`` table for the producers file."""
    listed = ", ".join(f'"{a}"' for a in accounts)
    note = "" if accounts else '  # name the accounts it may name, or ["*"] for every one'
    return (
        f"[producers.{producer_id}]\n"
        f'public_key = """\n{public_pem(key)}"""\n'
        f"accounts = [{listed}]{note}\n"
        f"kill_switch = {'true' if kill_switch else 'false'}\n"
    )


def generate(out_dir: Path, producer_id: str) -> tuple[Path, Ed25519PrivateKey]:
    """A new key pair: the private key written to ``out_dir/<id>.key`` (mode 0600, never
    over an existing file), the public key to ``out_dir/<id>.pub``."""
    if not PRODUCER_ID.fullmatch(producer_id):
        raise ProducerKeyError(f"producer id {producer_id!r} must be 1 to 64 of A-Z a-z 0-9 . _ -")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = out_dir / f"{producer_id}.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ProducerKeyError(f"{path} exists: not overwritten") from None
    except OSError as exc:
        raise ProducerKeyError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    os.chmod(path, 0o600)  # whatever the umask
    (out_dir / f"{producer_id}.pub").write_text(public_pem(key))
    return path, key
