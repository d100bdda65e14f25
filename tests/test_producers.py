"""The producers file, signatures and keygen, without Kafka (the broker cases are in
tests/test_hostile_producers.py)."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tests.support import run_cli
from worker.producers import (
    ACCOUNT_NOT_ENTITLED,
    BAD_SIGNATURE,
    KILL_SWITCH_NOT_ENTITLED,
    MISSING_HEADER,
    UNKNOWN_PRODUCER,
    Producer,
    Producers,
    ProducersError,
    Refusal,
    load_private_key,
    load_producers,
    parse_producers,
    public_pem,
    signed_headers,
    stanza,
)

OLD, NEW, OTHER = (Ed25519PrivateKey.generate() for _ in range(3))
VALUE = b'{"command_id":"c1","account":"desk-a"}'


def _load(tmp_path: Path, text: str) -> Producers:
    path = tmp_path / "producers.toml"
    path.write_text(text)
    return load_producers(path)


def test_a_rotation_accepts_every_listed_key_and_none_other(tmp_path: Path) -> None:
    (tmp_path / "new.pub").write_text(public_pem(NEW))
    producers = _load(
        tmp_path,
        "[producers.risk-7]\n"
        f'public_key = ["""{public_pem(OLD)}"""]\n'
        'public_key_file = ["new.pub"]\n'
        'accounts = ["desk-a"]\n',
    )
    for key in (OLD, NEW):
        verified = producers.verify(signed_headers("risk-7", key, VALUE), VALUE)
        assert isinstance(verified, Producer) and verified.id == "risk-7"
    refused = producers.verify(signed_headers("risk-7", OTHER, VALUE), VALUE)
    assert isinstance(refused, Refusal) and refused.cause == BAD_SIGNATURE
    # Once the old key is removed from the file, its signatures are refused.
    producers = _load(tmp_path, stanza("risk-7", NEW, ["desk-a"]))
    refused = producers.verify(signed_headers("risk-7", OLD, VALUE), VALUE)
    assert isinstance(refused, Refusal) and refused.cause == BAD_SIGNATURE


def test_a_public_key_no_signature_verifies_under_is_refused_at_load(tmp_path: Path) -> None:
    """A point of small order (here the identity) loads as a key in OpenSSL; libsodium,
    which checks the signatures, would refuse every command under it as bad_signature.
    The file is refused instead, naming the producer."""
    identity = Ed25519PublicKey.from_public_bytes(b"\x01" + b"\x00" * 31)
    with pytest.raises(ProducersError, match=r"'risk-7'.*not a usable Ed25519 public key"):
        _load(tmp_path, stanza("risk-7", identity, ["desk-a"]))


# The group order of Ed25519: a signature's S plus it verifies under a lax check.
_L = 2**252 + 27742317777372353535851937790883648493


def test_a_tampered_value_or_signature_is_refused_every_way() -> None:
    """Every single bit flipped in the value or the signature, the signature of another
    value or key, the same signature with S made non-canonical (S + L: the malleable twin a
    lax verifier accepts) and a signature of another length are refused; the untouched
    pair is accepted."""
    producer = Producer("risk-7", (OLD.public_key(),), None, False)
    signature = OLD.sign(VALUE)
    assert producer.signed(VALUE, signature)
    assert producer.signed(b"", OLD.sign(b""))
    for i in range(len(VALUE) * 8):
        flipped = bytearray(VALUE)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not producer.signed(bytes(flipped), signature)
    for i in range(len(signature) * 8):
        flipped = bytearray(signature)
        flipped[i // 8] ^= 1 << (i % 8)
        assert not producer.signed(VALUE, bytes(flipped))
    assert not producer.signed(VALUE, OLD.sign(VALUE + b" "))
    assert not producer.signed(VALUE, OTHER.sign(VALUE))
    s = int.from_bytes(signature[32:], "little") + _L
    assert not producer.signed(VALUE, signature[:32] + s.to_bytes(32, "little"))
    assert not producer.signed(VALUE, signature[:63])  # not 64 bytes: no signature
    assert not producer.signed(VALUE, b"")


def test_entitlements_name_accounts_and_the_kill_switch(tmp_path: Path) -> None:
    producers = _load(
        tmp_path,
        stanza("desk-a-engine", OLD, ["desk-a"]) + stanza("ops", NEW, ["*"], kill_switch=True),
    )
    engine, ops = producers.get("desk-a-engine"), producers.get("ops")
    assert engine is not None and ops is not None
    assert Producers.entitled(engine, "desk-a", kill_switch=False) is None
    refused = Producers.entitled(engine, "desk-b", kill_switch=False)
    assert refused is not None and refused.cause == ACCOUNT_NOT_ENTITLED
    refused = Producers.entitled(engine, "desk-a", kill_switch=True)
    assert refused is not None and refused.cause == KILL_SWITCH_NOT_ENTITLED
    assert Producers.entitled(ops, "any-desk", kill_switch=True) is None
    unknown = producers.verify(signed_headers("nobody", OLD, VALUE), VALUE)
    assert isinstance(unknown, Refusal) and (unknown.producer, unknown.cause) == (
        "unknown",
        UNKNOWN_PRODUCER,
    )
    missing = producers.verify([("x-producer", b"ops")], VALUE)
    assert isinstance(missing, Refusal) and missing.cause == MISSING_HEADER


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no [producers.<id>] tables"),
        ("[producer.x]\n", "unknown top-level table or key 'producer'; did you mean 'producers'?"),
        (stanza("x", OLD, ["a"]) + "acounts = []\n", "unknown field 'acounts'; did you mean"),
        ('[producers.x]\naccounts = ["a"]\n', "public_key or public_key_file is required"),
        (stanza("x", OLD, ["a"]).replace('accounts = ["a"]\n', ""), "accounts is required"),
        (stanza("x", OLD, ["*", "a"]), '"*" (every account) stands alone'),
        (stanza("x", OLD, ["a"]).replace("false", '"no"'), "kill_switch must be true or false"),
        (stanza("x y", OLD, ["a"]).replace("x y", '"x y"'), "producer id 'x y' must be"),
        ('[producers.x]\npublic_key_file = "missing.pub"\naccounts = ["a"]\n', "cannot read"),
    ],
)
def test_a_broken_producers_file_says_what_is_wrong(
    tmp_path: Path, text: str, fragment: str
) -> None:
    with pytest.raises(ProducersError) as info:
        _load(tmp_path, text)
    assert fragment in str(info.value)
    assert str(tmp_path) in str(info.value)  # the file is named


def test_an_rsa_key_is_not_a_producer_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    data = {"producers": {"x": {"public_key": pem, "accounts": ["a"]}}}
    with pytest.raises(ProducersError, match="must be an Ed25519 public key"):
        parse_producers(data, tmp_path)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_a_table_that_loads(
    tmp_path: Path,
) -> None:
    args = ("keygen", "--out", str(tmp_path), "--producer", "risk-7", "--account", "desk-a")
    done = run_cli(*args, env={})
    assert done.returncode == 0, done.stderr
    key_file = tmp_path / "risk-7.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert "private key written to" in done.stderr and "PRIVATE KEY" not in done.stdout
    (tmp_path / "producers.toml").write_text(done.stdout)
    assert tomllib.loads(done.stdout)["producers"]["risk-7"]["kill_switch"] is False
    producers = load_producers(tmp_path / "producers.toml")
    key = load_private_key(key_file)
    verified = producers.verify(signed_headers("risk-7", key, VALUE), VALUE)
    assert isinstance(verified, Producer) and verified.accounts == frozenset({"desk-a"})
    # Never over an existing key: exit 2, the key unchanged.
    before = key_file.read_bytes()
    again = run_cli(*args, env={})
    assert again.returncode == 2 and "exists" in again.stderr, again.stderr
    assert key_file.read_bytes() == before
