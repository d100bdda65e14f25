"""Per-account credentials from ``CANCEL_WORKER_ACCOUNTS_FILE`` (TOML).

::

    [accounts.desk-a]
    api_key = "..."              # or api_key_file = "/run/secrets/desk-a/api_key"
    secret = "..."               # HMAC; or secret_file = "..."

    [accounts.desk-b]
    api_key_file = "/run/secrets/desk-b/api_key"
    private_key_file = "/run/secrets/desk-b/key.pem"   # Ed25519 or RSA, PKCS#8 PEM
    private_key_passphrase_file = "/run/secrets/desk-b/pass"   # optional
    reserved_weight_share = 0.2   # optional: this share of the IP weight is held for it

Values read from files are stripped of surrounding whitespace, so Kubernetes secret
mounts work as they are. Secrets never appear in ``repr`` or in error messages. An unknown
field or top-level table (a misspelt ``secret_flie``) is refused, with a did-you-mean; only
names are ever quoted, never values. A file that is not UTF-8 text is refused without a byte
of it shown; an API key (an HTTP header value) must be printable ASCII with no space, tab or
line break, and what is wrong is named, never shown. A secret, private key or passphrase
file is read whatever its mode, with a WARNING when others may read it, or its group may and
it is not one of this process's groups (Kubernetes' ``defaultMode: 0440`` with the pod's
``fsGroup`` is fine). Secrets written inline in the accounts file get no such warning: keep
them in files, or the accounts file itself 0600.

``reserved_weight_share`` (optional, above 0 and below 1): the share of the IP weight budget
the rate governor holds for the account all window long, even while it is idle; the shares
of the accounts without one are equal parts of what the reserved shares leave (see
:mod:`worker.exchange.governor`). The reserved shares add up to at most 1, and to less than 1 when
some account has none.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from worker.exchange.signing import Ed25519Signer, HmacSigner, RsaSigner, Signer

TABLES = ("accounts",)
FIELDS = (
    "api_key",
    "api_key_file",
    "secret",
    "secret_file",
    "private_key_file",
    "private_key_passphrase",
    "private_key_passphrase_file",
    "reserved_weight_share",
)


log = logging.getLogger(__name__)

# The files that hold what signs: a WARNING when others may read them.
_SECRET_FILES = frozenset({"secret", "private_key", "private_key_passphrase"})
# An HTTP header value the exchange takes as an API key: printable ASCII, no whitespace.
_API_KEY = re.compile(r"[\x21-\x7e]+")


class AccountsError(ValueError):
    """The accounts file is missing, malformed or names a key that cannot be loaded."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The hint for a name that is not in ``known``: the closest one, or the list (only
    names are quoted, never values). Shared by the accounts and producers files."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"


def _unknown(what: str, name: str, known: Iterable[str]) -> AccountsError:
    """The error for a name that is not in ``known``."""
    return AccountsError(f"{what} {name!r}{did_you_mean(name, known)}")


@dataclass(frozen=True)
class Credentials:
    alias: str
    api_key: str = field(repr=False)
    signer: Signer
    # Verification material, for the simulator: the HMAC secret or the public key.
    hmac_secret: str | None = field(default=None, repr=False)
    public_key: Ed25519PublicKey | RSAPublicKey | None = field(default=None, repr=False)
    # The share of the IP weight the rate governor holds for this account (None: an equal
    # part of what the reserved shares leave).
    reserved_weight_share: float | None = None

    @property
    def key_kind(self) -> str:
        return self.signer.kind


def _value(alias: str, entry: dict[str, Any], name: str, base: Path) -> str | None:
    inline = entry.get(name)
    from_file = entry.get(f"{name}_file")
    if inline is not None and from_file is not None:
        raise AccountsError(f"account {alias!r}: give {name} or {name}_file, not both")
    if inline is not None:
        if not isinstance(inline, str) or not inline.strip():
            raise AccountsError(f"account {alias!r}: {name} must be a non-empty string")
        return inline.strip()
    if from_file is not None:
        return _text(alias, name, _read(alias, name, base, from_file))
    return None


def _text(alias: str, name: str, raw: bytes) -> str:
    """A secret file's text; never a byte of it in the error."""
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise AccountsError(
            f"account {alias!r}: {name}_file is not UTF-8 text (an undecodable byte at "
            f"offset {exc.start}; its content is not shown)"
        ) from None


def _check_api_key(alias: str, key: str) -> None:
    """An API key travels as the X-MBX-APIKEY header: printable ASCII, no whitespace."""
    if _API_KEY.fullmatch(key):
        return
    if "\r" in key or "\n" in key:
        what = "a line break"
    elif " " in key or "\t" in key:
        what = "a space or tab"
    elif not key.isascii():
        what = "a character that is not ASCII"
    else:
        what = "a control character"
    raise AccountsError(
        f"account {alias!r}: api_key has {what} (it is sent as an HTTP header: printable "
        "ASCII with no whitespace; its value is not shown)"
    )


def warn_if_exposed(path: Path, what: str) -> None:
    """A WARNING when ``path`` may be read by others, or by a group this process is not in."""
    try:
        info = path.stat()
    except OSError:
        return
    mode = stat.S_IMODE(info.st_mode)
    own_groups = {os.getgid(), os.getegid(), *os.getgroups()}
    if mode & stat.S_IROTH or (mode & stat.S_IRGRP and info.st_gid not in own_groups):
        log.warning(
            "%s %s may be read by other users (mode %04o): it holds credentials; "
            "make it 0600 (or 0640 for this process's own group)",
            what,
            path,
            mode,
        )


def _read(alias: str, name: str, base: Path, path_value: object) -> bytes:
    if not isinstance(path_value, str):
        raise AccountsError(f"account {alias!r}: {name}_file must be a path string")
    path = (base / path_value).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AccountsError(
            f"account {alias!r}: cannot read {name}_file {path}: {exc.strerror}"
        ) from exc
    if name in _SECRET_FILES:
        warn_if_exposed(path, f"account {alias!r}: {name}_file")
    return raw


def _private_key_signer(
    alias: str, pem: bytes, passphrase: str | None
) -> tuple[Signer, Ed25519PublicKey | RSAPublicKey]:
    try:
        key = serialization.load_pem_private_key(
            pem, password=passphrase.encode("utf-8") if passphrase else None
        )
    except (ValueError, TypeError) as exc:
        # The library's message names the problem (bad decrypt, unsupported), never key bytes.
        raise AccountsError(f"account {alias!r}: private key cannot be loaded: {exc}") from None
    if isinstance(key, Ed25519PrivateKey):
        return Ed25519Signer(key), key.public_key()
    if isinstance(key, RSAPrivateKey):
        return RsaSigner(key), key.public_key()
    raise AccountsError(f"account {alias!r}: private key must be Ed25519 or RSA")


def _tables(data: dict[str, Any]) -> dict[str, Any]:
    """The ``[accounts.<alias>]`` tables, after checking the file's top level."""
    for name in data:
        if name not in TABLES:
            raise _unknown("unknown top-level table or key", name, TABLES)
    accounts = data.get("accounts")
    if not isinstance(accounts, dict) or not accounts:
        raise AccountsError("no [accounts.<alias>] tables")
    return accounts


def parse_account(alias: str, entry: object, base: Path) -> Credentials:
    """One account's credentials from its table; ``base`` resolves relative file paths."""
    if not isinstance(entry, dict):
        raise AccountsError(f"account {alias!r} must be a table")
    for name in entry:
        if name not in FIELDS:
            raise _unknown(f"account {alias!r}: unknown field", name, FIELDS)
    api_key = _value(alias, entry, "api_key", base)
    if not api_key:
        raise AccountsError(f"account {alias!r}: api_key is required")
    _check_api_key(alias, api_key)
    share = _reserved_share(alias, entry.get("reserved_weight_share"))
    secret = _value(alias, entry, "secret", base)
    pem_path = entry.get("private_key_file")
    if (secret is None) == (pem_path is None):
        raise AccountsError(f"account {alias!r}: give exactly one of secret or private_key_file")
    if secret is not None:
        return Credentials(
            alias, api_key, HmacSigner(secret), hmac_secret=secret, reserved_weight_share=share
        )
    pem = _read(alias, "private_key", base, pem_path)
    passphrase = _value(alias, entry, "private_key_passphrase", base)
    signer, public = _private_key_signer(alias, pem, passphrase)
    return Credentials(alias, api_key, signer, public_key=public, reserved_weight_share=share)


def _reserved_share(alias: str, value: object) -> float | None:
    if value is None:
        return None
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not 0 < value < 1
    ):
        raise AccountsError(
            f"account {alias!r}: reserved_weight_share must be a number above 0 and below 1"
        )
    return float(value)


def _check_reserved_shares(tables: dict[str, Any]) -> None:
    """The reserved shares of the whole file: together at most 1, and below 1 when some
    account has none (it would never be given any weight)."""
    shares = [
        entry.get("reserved_weight_share") if isinstance(entry, dict) else None
        for entry in tables.values()
    ]
    given = [s for s in shares if isinstance(s, int | float) and not isinstance(s, bool)]
    total = sum(given)
    unreserved = len(shares) - len(given)
    if total > 1 or (unreserved and total >= 1):
        raise AccountsError(
            f"the accounts' reserved_weight_share values add up to {total:g}: they must add "
            "up to at most 1, and to less than 1 when some account has none"
        )


def parse_accounts(data: dict[str, Any], base: Path) -> dict[str, Credentials]:
    """Build credentials from parsed TOML; ``base`` resolves relative file paths."""
    tables = _tables(data)
    accounts = {alias: parse_account(alias, entry, base) for alias, entry in tables.items()}
    _check_reserved_shares(tables)
    return accounts


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AccountsError(f"cannot read accounts file {path}: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AccountsError(
            f"accounts file {path} is not UTF-8 text (an undecodable byte at offset "
            f"{exc.start}; its content is not shown)"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccountsError(f"accounts file {path} is not valid TOML: {exc}") from None


def load_accounts(path: Path) -> dict[str, Credentials]:
    """Read and parse the accounts file."""
    data = _read_toml(path)
    try:
        return parse_accounts(data, path.parent)
    except AccountsError as exc:
        raise AccountsError(f"accounts file {path}: {exc}") from None


def load_each_account(path: Path) -> dict[str, Credentials | AccountsError]:
    """Every account of the file, loaded on its own: its credentials, or why they cannot
    be loaded (``cancel-worker check`` names every broken account, not the first one).
    Raises :class:`AccountsError` for what spoils the whole file (unreadable, not TOML, no
    ``[accounts.<alias>]`` table, an unknown top-level name)."""
    data = _read_toml(path)
    try:
        tables = _tables(data)
        _check_reserved_shares(tables)
    except AccountsError as exc:
        raise AccountsError(f"accounts file {path}: {exc}") from None
    each: dict[str, Credentials | AccountsError] = {}
    for alias, entry in tables.items():
        try:
            each[alias] = parse_account(alias, entry, path.parent)
        except AccountsError as exc:
            each[alias] = exc
    return each
