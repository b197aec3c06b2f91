"""The entry envelope (cachesvc/envelope.py): a large value is read as a view of its payload,
not copied, with every other field as msgpack gives it; a damaged large envelope is a miss."""

from __future__ import annotations

import pytest

from cachesvc.envelope import Entry, decode_envelope, decode_live
from tiers.base import VIEWED_SIZE

LARGE = bytes(range(256)) * (VIEWED_SIZE // 256 + 1)


@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_large_value_is_a_view_of_its_payload(sealed: bool) -> None:
    entry = Entry(LARGE, "image/png", 7, 1e12, ("a", "b"), sealed)
    payload = entry.encode()
    # Read from bytes, or from a view (as tiers hand payloads out): a view of those bytes.
    for stored in (payload, memoryview(payload)[:]):
        decoded = decode_envelope(stored)
        assert decoded == entry
        assert isinstance(decoded.value, memoryview) and decoded.value.obj is payload


def test_a_small_value_is_bytes() -> None:
    entry = Entry(b"small", "text/plain", 1, None)
    assert type(decode_envelope(entry.encode()).value) is bytes


def test_a_large_envelope_cut_short_or_with_trailing_bytes_is_a_miss() -> None:
    payload = Entry(LARGE, "text/plain", 1, None).encode()
    for damaged in (payload[:-10], payload[: VIEWED_SIZE + 10], payload + b"\x00"):
        with pytest.raises(ValueError, match="not a cachesvc envelope"):
            decode_envelope(damaged)
        assert decode_live(damaged, 0.0) is None
