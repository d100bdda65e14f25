"""Request signing for PAPI (pure functions plus a small ``httpx.Auth``).

Binance signs ``totalParams``: the exact query string (followed directly by the body, which
this worker never uses for a DELETE). ``signature`` is appended last. Three key kinds:

* HMAC-SHA256: lowercase hex digest of the payload under the secret.
* Ed25519: base64 of the Ed25519 signature of the payload.
* RSA (PKCS#8): base64 of RSASSA-PKCS1-v1_5 / SHA-256 of the payload.

Base64 signatures are URL-encoded when appended. The signer signs exactly the bytes sent:
:class:`PapiAuth` adds ``timestamp`` and ``signature`` to the request's final query at send
time, so every attempt (every ``send``) carries a fresh timestamp and a fresh signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Generator, Iterable
from typing import Protocol
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey


class Signer(Protocol):
    """Turns the payload bytes into the value of the ``signature`` parameter (not yet encoded)."""

    kind: str

    def sign(self, payload: bytes) -> str: ...


def hmac_sha256_hex(secret: str, payload: bytes) -> str:
    """Binance HMAC signature: lowercase hex HMAC-SHA256 of the payload."""
    return hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()


class HmacSigner:
    kind = "hmac"

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def sign(self, payload: bytes) -> str:
        return hmac_sha256_hex(self._secret, payload)

    def __repr__(self) -> str:
        return "HmacSigner(<secret>)"


class Ed25519Signer:
    kind = "ed25519"

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload)).decode("ascii")

    def __repr__(self) -> str:
        return "Ed25519Signer(<private key>)"


class RsaSigner:
    kind = "rsa"

    def __init__(self, key: RSAPrivateKey) -> None:
        self._key = key

    def sign(self, payload: bytes) -> str:
        raw = self._key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return "RsaSigner(<private key>)"


def encode_params(params: Iterable[tuple[str, str]]) -> str:
    """Percent-encode parameters in the given order (order is part of what is signed)."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)


def append_signature(query: str, signer: Signer) -> str:
    """Return ``query`` with ``&signature=...`` appended, signed over exactly ``query``."""
    signature = signer.sign(query.encode("ascii"))
    sep = "&" if query else ""
    return f"{query}{sep}signature={quote(signature, safe='')}"


class PapiAuth(httpx.Auth):
    """Adds ``timestamp``, ``signature`` and ``X-MBX-APIKEY`` to a request as it is sent.

    ``clock`` returns the exchange-corrected time in ms; it is read once per send, so each
    attempt is signed afresh.
    """

    def __init__(self, api_key: str, signer: Signer, clock: Callable[[], int]) -> None:
        self._api_key = api_key
        self._signer = signer
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        query = request.url.query.decode("ascii")
        query = f"{query}&timestamp={self._clock()}" if query else f"timestamp={self._clock()}"
        signed = append_signature(query, self._signer)
        request.url = request.url.copy_with(query=signed.encode("ascii"))
        request.headers["X-MBX-APIKEY"] = self._api_key
        yield request

    def __repr__(self) -> str:
        return f"PapiAuth(signer={self._signer.kind})"
