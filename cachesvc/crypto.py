"""Encryption of an encrypted namespace's values: AES-256-GCM from ``cryptography``.

Keys come from an environment variable named by the namespace's ``encryption_keys_env``::

    PATIENTS_KEYS="k2:<base64 of 32 bytes>,k1:<base64 of 32 bytes>"

The first key seals every new value; every listed key opens. Rotation is a new key put
first; a key is removed once no tier can still hold a value it sealed (the longest tier
ttl after it stopped being first). A value sealed under a key no longer listed, or whose
authentication fails, opens as ``None``: the engine reads it as a miss, never as an error
or as garbage.

A sealed value is::

    0x01 | len(key id) (1 byte) | key id (ASCII) | nonce (12 random bytes) | ciphertext+tag

and the associated data authenticated with it is everything before the nonce (format and
key id) followed by the namespace (length-prefixed) and the cache key, so a sealed value
copied under another key or into another namespace does not open.

Only the value is sealed: the envelope's version, expiry and tags stay readable because
every tier, the journal's flusher and the invalidation markers work on them without
decrypting (docs/governance.md, "What stays visible").

Random 96-bit nonces keep one key safe for 2**32 seals (NIST SP 800-38D, 8.3): the fleet's
writes under one key must stay below that, so rotate before. ``Cipher.seals`` counts the
seals of this process per key id.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cachesvc.envelope import Entry
from tiers.base import Payload

FORMAT = 1
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96 bits: GCM's native nonce size
TAG_BYTES = 16
# Printable, and free of the list's own separators (":" and ",").
KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")

Classification = Literal["public", "internal", "confidential", "restricted"]
CLASSIFICATIONS: tuple[Classification, ...] = ("public", "internal", "confidential", "restricted")
# The classes whose values must never leave the process in clear.
NEEDS_ENCRYPTION: frozenset[Classification] = frozenset({"confidential", "restricted"})


class Key(NamedTuple):
    id: str
    secret: bytes  # 32 bytes

    def __repr__(self) -> str:  # never the secret, in a log or a traceback
        return f"Key(id={self.id!r})"


def parse_keys(text: str, source: str = "the key list") -> list[Key]:
    """The keys in ``"<id>:<base64 of 32 bytes>[,<id>:<base64>...]"``, first one first.

    ValueError names what is wrong (and ``source``, e.g. the variable's name), never a
    secret: an item that is not ``id:base64``, an id that is not 1-64 of ``A-Z a-z 0-9 _ .
    -``, a duplicate id, bad base64, a key that is not 32 bytes, an empty list.
    """
    keys: list[Key] = []
    seen: set[str] = set()
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        key_id, colon, encoded = item.partition(":")
        key_id, encoded = key_id.strip(), encoded.strip()
        where = f"{source}, key {position}"
        if not item:
            raise ValueError(f"{where} is empty (expected <id>:<base64 of 32 bytes>)")
        if not colon:
            raise ValueError(f"{where}: expected <id>:<base64 of 32 bytes>, found no ':'")
        if not KEY_ID.fullmatch(key_id):
            raise ValueError(
                f"{where}: the id {key_id!r} must be 1-64 letters, digits, '_', '.' or '-'"
            )
        where = f"{source}, key {key_id!r}"
        if key_id in seen:
            raise ValueError(f"{where} is listed twice")
        seen.add(key_id)
        try:
            secret = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError(f"{where} is not valid base64") from None
        if len(secret) != KEY_BYTES:
            raise ValueError(
                f"{where} is {len(secret)} bytes; AES-256 needs {KEY_BYTES} "
                "(e.g. head -c 32 /dev/urandom | base64)"
            )
        keys.append(Key(key_id, secret))
    return keys


def keys_from_environment(variable: str, environ: Mapping[str, str] | None = None) -> list[Key]:
    """The keys in the environment variable ``variable``; ValueError when it is unset or
    empty, or as ``parse_keys``."""
    value = (os.environ if environ is None else environ).get(variable, "")
    if not value.strip():
        raise ValueError(f"the environment variable {variable} (the encryption keys) is not set")
    return parse_keys(value, source=variable)


def namespace_cipher(
    classification: Classification,
    keys_env: str | None,
    environ: Mapping[str, str] | None = None,
) -> Cipher | None:
    """A namespace's cipher from its ``classification`` and ``encryption_keys_env``; None
    when it is not encrypted. ValueError, about ``encryption_keys_env``, when a
    confidential or restricted namespace names no variable, or the variable is unset or
    malformed (the config reports it under that field)."""
    if keys_env is None:
        if classification in NEEDS_ENCRYPTION:
            raise ValueError(
                f"a {classification} namespace needs encryption keys: name the environment "
                'variable that holds them ("<id>:<base64 of 32 bytes>,...")'
            )
        return None
    return Cipher(keys_from_environment(keys_env, environ))


class Cipher:
    """Seals and opens the values of one namespace's entries."""

    def __init__(self, keys: Sequence[Key]) -> None:
        if not keys:
            raise ValueError("a cipher needs at least one key")
        self.key_ids = tuple(key.id for key in keys)
        self._aead = {key.id: AESGCM(key.secret) for key in keys}
        first = keys[0].id
        self._sealing = self._aead[first]
        self._header = struct.pack("BB", FORMAT, len(first)) + first.encode("ascii")
        self.seals: Counter[str] = Counter()

    def seal(self, namespace: str, key: str, plaintext: bytes) -> bytes:
        """``plaintext`` encrypted and authenticated together with ``namespace`` and
        ``key``, under the first key and a fresh random nonce."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._sealing.encrypt(nonce, plaintext, _bound(self._header, namespace, key))
        self.seals[self.key_ids[0]] += 1
        return self._header + nonce + sealed

    def open(self, namespace: str, key: str, sealed: Payload) -> bytes | None:
        """The plaintext of a value ``seal`` made for ``namespace`` and ``key``; None when
        it is not one (another format, a key no longer listed, altered, or sealed for
        another key or namespace)."""
        key_id = sealed_key_id(sealed)
        aead = None if key_id is None else self._aead.get(key_id)
        if aead is None:
            return None
        header_length = 2 + len(key_id or "")
        nonce = sealed[header_length : header_length + NONCE_BYTES]
        try:
            return aead.decrypt(
                nonce,
                sealed[header_length + NONCE_BYTES :],
                _bound(bytes(sealed[:header_length]), namespace, key),
            )
        except InvalidTag:
            return None


def sealed_key_id(sealed: Payload) -> str | None:
    """The id of the key that sealed ``sealed``, or None when it is not a sealed value of a
    known format (for instance to count the values still held under a retiring key)."""
    if len(sealed) < 2 or sealed[0] != FORMAT:
        return None
    header_length = 2 + sealed[1]
    if len(sealed) < header_length + NONCE_BYTES + TAG_BYTES:
        return None
    try:
        return bytes(sealed[2:header_length]).decode("ascii")
    except UnicodeDecodeError:
        return None


def _bound(header: bytes, namespace: str, key: str) -> bytes:
    """The associated data: the header, then the namespace length-prefixed (so that
    ("ab", "c") and ("a", "bc") differ), then the key. Keys that are not valid UTF-8
    (lone surrogates from a percent-decoded path) are bound byte for byte, not refused."""
    space = namespace.encode("utf-8", "surrogatepass")
    return header + struct.pack(">I", len(space)) + space + key.encode("utf-8", "surrogatepass")


# -- reading an entry back ---------------------------------------------------------------------


def open_entry(cipher: Cipher | None, namespace: str, key: str, entry: Entry) -> Entry | None:
    """The entry as the client wrote it, or None (a miss).

    ``cipher`` is the namespace's (None: not encrypted). A miss is also: a sealed entry in
    a namespace no longer encrypted (it would be served as ciphertext), and a plain entry in
    an encrypted one (written before encryption was turned on: the namespace's values are
    then never served from a copy kept in clear, and the refill stores them sealed)."""
    if cipher is None:
        return None if entry.sealed else entry
    if not entry.sealed:
        return None
    value = cipher.open(namespace, key, entry.value)
    return None if value is None else entry._replace(value=value, sealed=False)
