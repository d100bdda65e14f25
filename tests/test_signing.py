"""Signing (pure): known vectors, key kinds, fresh signature per send."""

from __future__ import annotations

import base64
from urllib.parse import unquote

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from worker.core.routes import encode_params
from worker.exchange.signing import (
    Ed25519Signer,
    HmacSigner,
    PapiAuth,
    RsaSigner,
    SigningRefusedError,
    append_signature,
    hmac_sha256_hex,
    recv_window_for,
    with_query,
)


@pytest.mark.parametrize(
    ("secret", "payload", "expected"),
    [
        (
            "YtP1BudNOWZE1ag5uzCkh4hIC7qSmQOu797r5EJBFGhxBYivjj8HIX0iiiPof5yG",
            "symbol=BTC-210129-40000-C&side=BUY&type=LIMIT&timeInForce=GTC&quantity=0.01&price=2000"
            "&recvWindow=5000&timestamp=1611825601400",
            "7c12045972f6140e765e0f2b67d28099718df805732676494238f50be830a7d7",
        ),
        (
            "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9",
            "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000"
            "&timestamp=1591702613943",
            "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9",
        ),
    ],
)
def test_hmac_known_good_vectors(secret: str, payload: str, expected: str) -> None:
    assert hmac_sha256_hex(secret, payload.encode()) == expected
    assert append_signature(payload, HmacSigner(secret)) == f"{payload}&signature={expected}"


def test_ed25519_signature_verifies_and_is_url_encoded() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    query = "algoId=5&recvWindow=5000&timestamp=1"
    signed = append_signature(query, Ed25519Signer(key))
    value = signed.rsplit("&signature=", 1)[1]
    assert "+" not in value and "/" not in value and "=" not in value  # percent-encoded
    key.public_key().verify(base64.b64decode(unquote(value)), query.encode())


def test_rsa_signature_verifies() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    query = "symbol=BTCUSD_PERP&strategyId=9&timestamp=1"
    value = append_signature(query, RsaSigner(key)).rsplit("&signature=", 1)[1]
    key.public_key().verify(
        base64.b64decode(unquote(value)), query.encode(), padding.PKCS1v15(), hashes.SHA256()
    )


def test_params_are_encoded_in_order_and_escape_separators() -> None:
    assert encode_params([("b", "1"), ("a", "x&y=z/:")]) == "b=1&a=x%26y%3Dz%2F%3A"


def test_auth_signs_each_send_afresh_with_signature_last() -> None:
    times = iter([1000, 2000])
    auth = PapiAuth("the-key", HmacSigner("s3cret"), lambda: next(times))
    urls = []
    for _ in range(2):
        request = httpx.Request("DELETE", "http://papi.test/papi/v1/um/algo/order?algoId=5")
        signed = next(auth.auth_flow(request))
        assert signed.headers["X-MBX-APIKEY"] == "the-key"
        urls.append(signed.url.query.decode())
    first, second = urls
    assert first.startswith("algoId=5&timestamp=1000&signature=")
    assert second.startswith("algoId=5&timestamp=2000&signature=")
    assert first.rsplit("=", 1)[1] != second.rsplit("=", 1)[1]
    payload, sig = first.rsplit("&signature=", 1)
    assert sig == hmac_sha256_hex("s3cret", payload.encode())


def test_recv_window_and_timestamp_come_from_one_reading_and_never_pass_expires_at() -> None:
    times = iter([1_000, 4_000, 9_000])
    base = PapiAuth("k", HmacSigner("s"), lambda: next(times))
    auth = base.for_request(5_000, expires_at=9_000)
    queries = []
    for _ in range(2):
        request = httpx.Request("DELETE", "http://papi.test/papi/v1/um/algo/order?algoId=5")
        queries.append(next(auth.auth_flow(request)).url.query.decode())
    assert queries[0].startswith("algoId=5&recvWindow=5000&timestamp=1000&signature=")
    assert queries[1].startswith("algoId=5&recvWindow=5000&timestamp=4000&signature=")
    request = httpx.Request("DELETE", "http://papi.test/papi/v1/um/algo/order?algoId=5")
    with pytest.raises(SigningRefusedError):
        next(auth.auth_flow(request))  # 9000: the deadline itself


@pytest.mark.parametrize(
    ("now", "window", "expires_at", "expected"),
    [
        (1_000, 5_000, None, 5_000),
        (1_000, 99_000, None, 60_000),  # the exchange's ceiling
        (1_000, 5_000, 3_000, 2_000),  # timestamp + recvWindow == expires_at
        (2_999, 5_000, 3_000, 1),
    ],
)
def test_recv_window_for(now: int, window: int, expires_at: int | None, expected: int) -> None:
    assert recv_window_for(now, window, expires_at) == expected


def test_signers_do_not_reveal_keys_in_repr() -> None:
    assert "s3cret" not in repr(HmacSigner("s3cret"))
    assert "s3cret" not in repr(PapiAuth("k", HmacSigner("s3cret"), lambda: 0))


@pytest.mark.parametrize(
    "query",
    [
        "algoId=5&recvWindow=5000&timestamp=1&signature=ab%2Bc%3D",
        "symbol=BTCUSDT&newClientStrategyId=a%2Fb%3Ac&timestamp=2&signature=00ff",
        "",
    ],
)
def test_with_query_equals_copy_with(query: str) -> None:
    """The fast URL rewrite gives the very URL httpx's own copy_with would."""
    base = httpx.URL("https://papi.example:8443/papi/v1/um/algo/order")
    fast = with_query(base, query)
    slow = base.copy_with(query=query.encode())
    assert fast == slow
    assert fast.raw_path == slow.raw_path and str(fast) == str(slow)
    assert (fast.host, fast.port, fast.scheme) == ("papi.example", 8443, "https")


def test_auth_signs_a_prebuilt_query_without_reading_the_url() -> None:
    auth = PapiAuth("k", HmacSigner("s"), lambda: 7).for_request(5000, None, "algoId=9")
    request = httpx.Request("DELETE", "http://papi.test/papi/v1/um/algo/order")
    signed = next(auth.auth_flow(request)).url
    assert signed.path == "/papi/v1/um/algo/order"
    query = signed.query.decode()
    assert query.startswith("algoId=9&recvWindow=5000&timestamp=7&signature=")
    payload, sig = query.rsplit("&signature=", 1)
    assert sig == hmac_sha256_hex("s", payload.encode())
