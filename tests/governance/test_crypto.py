"""Sealing and opening values (cachesvc.crypto): the key list's parser, AES-256-GCM bound to
namespace and key, rotation both ways, and every way a value can fail to open reading as a
miss."""

from __future__ import annotations

import base64
import os

import msgpack
import pytest

from cachesvc.crypto import (
    Cipher,
    Classification,
    Key,
    keys_from_environment,
    namespace_cipher,
    open_entry,
    parse_keys,
    sealed_key_id,
)
from cachesvc.envelope import Entry, decode_envelope


def secret() -> bytes:
    return os.urandom(32)


def listed(*keys: tuple[str, bytes]) -> str:
    return ",".join(f"{key_id}:{base64.b64encode(raw).decode()}" for key_id, raw in keys)


K1, K2 = secret(), secret()


def test_the_list_parses_in_order() -> None:
    keys = parse_keys(listed(("k2", K2), ("k1", K1)))
    assert keys == [Key("k2", K2), Key("k1", K1)]
    spaced = parse_keys(f" k2 : {base64.b64encode(K2).decode()} ")
    assert spaced == [Key("k2", K2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (listed(("k1", os.urandom(16))), r"key 'k1' is 16 bytes; AES-256 needs 32"),
        (listed(("k1", K1), ("k1", K2)), r"key 'k1' is listed twice"),
        ("k1:not*base64!", r"key 'k1' is not valid base64"),
        (base64.b64encode(K1).decode(), r"key 1: expected <id>:<base64 of 32 bytes>, found no ':'"),
        (listed(("k 1", K1)), r"key 1: the id 'k 1' must be 1-64 letters"),
        ("", r"key 1 is empty"),
        (listed(("k1", K1)) + ",", r"key 2 is empty"),
    ],
)
def test_what_is_wrong_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_keys(text, source="PATIENTS_KEYS")
    assert str(caught.value).startswith("PATIENTS_KEYS, key ")
    for raw in (K1, K2):
        assert base64.b64encode(raw).decode() not in str(caught.value)


def test_keys_come_from_the_named_variable() -> None:
    assert keys_from_environment("KEYS", {"KEYS": listed(("a", K1))}) == [Key("a", K1)]
    with pytest.raises(ValueError, match=r"the environment variable KEYS .* is not set"):
        keys_from_environment("KEYS", {})


@pytest.mark.parametrize("classification", ["confidential", "restricted"])
def test_the_upper_classes_need_keys(classification: Classification) -> None:
    with pytest.raises(ValueError, match=f"a {classification} namespace needs encryption keys"):
        namespace_cipher(classification, None, {})
    with pytest.raises(ValueError, match=r"PATIENTS_KEYS .* is not set"):
        namespace_cipher(classification, "PATIENTS_KEYS", {})
    keys = {"PATIENTS_KEYS": listed(("k1", K1))}
    cipher = namespace_cipher(classification, "PATIENTS_KEYS", keys)
    assert cipher is not None and cipher.key_ids == ("k1",)


def test_the_lower_classes_may_be_encrypted() -> None:
    assert namespace_cipher("public", None, {}) is None
    assert namespace_cipher("internal", None, {}) is None
    cipher = namespace_cipher("internal", "KEYS", {"KEYS": listed(("k1", K1))})
    assert cipher is not None


def test_a_key_never_shows_its_secret() -> None:
    assert base64.b64encode(K1).decode() not in repr(parse_keys(listed(("k1", K1))))
    assert repr(K1) not in repr(Key("k1", K1))


def test_a_value_opens_under_its_namespace_and_key_only() -> None:
    cipher = Cipher([Key("k1", K1)])
    sealed = cipher.seal("patients", "p:1", b"diagnosis")
    assert b"diagnosis" not in sealed
    assert cipher.open("patients", "p:1", sealed) == b"diagnosis"
    assert cipher.open("patients", "p:2", sealed) is None  # copied under another key
    assert cipher.open("orders", "p:1", sealed) is None  # or into another namespace
    # The namespace and key are framed: moving a character from one to the other differs.
    assert cipher.open("patientsp", ":1", sealed) is None


def test_every_seal_has_its_own_nonce() -> None:
    cipher = Cipher([Key("k1", K1)])
    seals = {cipher.seal("ns", "k", b"same") for _ in range(100)}
    assert len(seals) == 100
    assert cipher.seals["k1"] == 100


def test_rotation_a_new_key_first_still_opens_the_old_ones() -> None:
    before = Cipher([Key("k1", K1)])
    old = before.seal("ns", "k", b"old")
    after = Cipher([Key("k2", K2), Key("k1", K1)])
    new = after.seal("ns", "k", b"new")
    assert sealed_key_id(old) == "k1" and sealed_key_id(new) == "k2"
    assert after.open("ns", "k", old) == b"old"
    assert after.open("ns", "k", new) == b"new"
    # Rolled back to the old list while k2 values are held: those read as misses.
    assert before.open("ns", "k", new) is None
    assert before.open("ns", "k", old) == b"old"
    # k1 retired: its values read as misses.
    assert Cipher([Key("k2", K2)]).open("ns", "k", old) is None


def test_a_key_listed_under_a_known_id_with_other_bytes_does_not_open() -> None:
    sealed = Cipher([Key("k1", K1)]).seal("ns", "k", b"v")
    assert Cipher([Key("k1", K2)]).open("ns", "k", sealed) is None


def test_an_altered_or_foreign_value_reads_as_nothing() -> None:
    cipher = Cipher([Key("k1", K1)])
    sealed = cipher.seal("ns", "k", b"value")
    for position in (0, 1, 2, 4, 10, len(sealed) - 1):
        altered = bytearray(sealed)
        altered[position] ^= 0x01
        assert cipher.open("ns", "k", bytes(altered)) is None, position
    for foreign in (b"", b"\x01", b"plain text value", sealed[:20], b"\x01\x02k1" + bytes(28)):
        assert cipher.open("ns", "k", foreign) is None


def test_an_empty_value_seals_and_opens() -> None:
    cipher = Cipher([Key("k1", K1)])
    assert cipher.open("ns", "k", cipher.seal("ns", "k", b"")) == b""


def seal_entry(cipher: Cipher, namespace: str, key: str, entry: Entry) -> Entry:
    """``entry`` as an encrypted namespace stores it (cachesvc.namespaces seals the value)."""
    return entry._replace(value=cipher.seal(namespace, key, entry.value), sealed=True)


def test_sealed_entries_keep_version_expiry_and_tags_readable() -> None:
    cipher = Cipher([Key("k1", K1)])
    entry = Entry(b"secret", "text/plain", 42, 1e10, ("user:7",))
    stored = seal_entry(cipher, "ns", "k", entry).encode()
    assert b"secret" not in stored
    decoded = decode_envelope(stored)
    assert (decoded.version, decoded.expires_at, decoded.tags) == (42, 1e10, ("user:7",))
    assert decoded.sealed
    assert open_entry(cipher, "ns", "k", decoded) == entry


def test_plain_envelopes_are_unchanged() -> None:
    entry = Entry(b"v", "text/plain", 1, None, ("t",))
    assert entry.encode() == msgpack.packb((b"v", "text/plain", 1, None, ("t",)))
    assert decode_envelope(entry.encode()) == entry


def test_a_namespace_serves_only_entries_of_its_own_kind() -> None:
    cipher = Cipher([Key("k1", K1)])
    plain = Entry(b"v", "text/plain", 1, None)
    sealed = seal_entry(cipher, "ns", "k", plain)
    # Encryption turned off: the sealed copy is not served as a value (it is ciphertext).
    assert open_entry(None, "ns", "k", sealed) is None
    assert open_entry(None, "ns", "k", plain) == plain
    # Turned on: a copy written in clear before is not served either.
    assert open_entry(cipher, "ns", "k", plain) is None
    # A sealed entry under a retired key: a miss.
    assert open_entry(Cipher([Key("k2", K2)]), "ns", "k", sealed) is None


def test_an_envelope_with_unknown_extra_fields_is_not_ours() -> None:
    with pytest.raises(ValueError, match="not a cachesvc envelope"):
        decode_envelope(msgpack.packb((b"v", "t", 1, None, (), "surprise")))
