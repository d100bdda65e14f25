"""Checking a signed request the way PAPI does (pure)."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote_to_bytes

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from worker.exchange.accounts import Credentials
from worker.exchange.signing import hmac_sha256_hex
from worker.tools.sim.book import SimError

MAX_RECV_WINDOW = 60_000


@dataclass(frozen=True)
class SignedParams:
    payload: bytes  # totalParams without the signature: what was signed
    signature: str  # the decoded value of the signature parameter
    params: dict[str, str]


def split_signed(query: bytes, body: bytes) -> SignedParams:
    """Separate ``signature`` from totalParams (query string followed directly by the body)."""
    kept: list[bytes] = []
    signatures: list[bytes] = []
    for part in (query, body):
        pieces = [p for p in part.split(b"&") if p] if part else []
        kept_here = [p for p in pieces if not p.startswith(b"signature=")]
        signatures += [p[len(b"signature=") :] for p in pieces if p.startswith(b"signature=")]
        if kept_here:
            kept.append(b"&".join(kept_here))
    if len(signatures) > 1:
        raise SimError(400, -1101, "Duplicate values for a parameter detected.")
    if not signatures or not signatures[0]:
        raise SimError(
            400,
            -1102,
            "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
        )
    payload = b"".join(kept)
    try:
        pairs = parse_qsl(payload.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        signature = unquote_to_bytes(signatures[0]).decode("ascii")
    except (UnicodeDecodeError, ValueError):
        raise SimError(400, -1100, "Illegal characters found in a parameter.") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise SimError(400, -1101, "Duplicate values for a parameter detected.")
        params[key] = value
    return SignedParams(payload, signature, params)


def verify_signature(creds: Credentials, signed: SignedParams) -> bool:
    if creds.hmac_secret is not None:
        expected = hmac_sha256_hex(creds.hmac_secret, signed.payload)
        return hmac.compare_digest(expected, signed.signature)
    try:
        raw = base64.b64decode(signed.signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    key = creds.public_key
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(raw, signed.payload)
            return True
        if isinstance(key, RSAPublicKey):
            key.verify(raw, signed.payload, padding.PKCS1v15(), hashes.SHA256())
            return True
    except InvalidSignature:
        return False
    return False


def check_timestamp(params: dict[str, str], server_time: int) -> None:
    """PAPI's rule: ``timestamp < serverTime + 1000``, ``serverTime - timestamp <= recvWindow``."""
    raw_ts = params.get("timestamp")
    if not raw_ts:
        raise SimError(
            400,
            -1102,
            "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
        )
    if not raw_ts.isdigit():
        raise SimError(
            400,
            -1100,
            "Illegal characters found in parameter 'timestamp'; legal range is '^[0-9]{1,20}$'.",
        )
    window = 5000
    raw_window = params.get("recvWindow")
    if raw_window is not None:
        if not raw_window.isdigit():
            raise SimError(
                400,
                -1100,
                "Illegal characters found in parameter 'recvWindow'; "
                "legal range is '^[0-9]{1,20}$'.",
            )
        window = int(raw_window)
        if window > MAX_RECV_WINDOW:
            raise SimError(400, -1131, "recvWindow must be less than 60000")
    timestamp = int(raw_ts)
    if timestamp >= server_time + 1000:
        raise SimError(
            400, -1021, "Timestamp for this request was 1000ms ahead of the server's time."
        )
    if server_time - timestamp > window:
        raise SimError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
