"""Parsing a published invalidation event: what counts as one, and what is malformed."""

from __future__ import annotations

import json

import pytest

from invalidation.events import InvalidationEvent, MalformedEvent, parse_event


def test_every_field_is_optional_and_unknown_fields_are_ignored() -> None:
    event = parse_event(json.dumps({"tags": ["tenant-7"], "publisher": "billing"}))
    assert event == InvalidationEvent(tags=("tenant-7",))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{}", "nothing to invalidate: give keys, prefixes or tags"),
        (
            '{"keyz": ["user:42"]}',
            "nothing to invalidate: give keys, prefixes or tags (unknown fields ignored: keyz)",
        ),
        ('{"keys": [], "tags": []}', "nothing to invalidate: give keys, prefixes or tags"),
        ('{"sent_at": 1767225600.5}', "nothing to invalidate: give keys, prefixes or tags"),
    ],
)
def test_an_event_that_names_nothing_is_malformed(raw: str, message: str) -> None:
    with pytest.raises(MalformedEvent) as caught:
        parse_event(raw)
    assert str(caught.value) == message


def test_sent_at_is_epoch_seconds() -> None:
    event = parse_event('{"keys": ["k"], "sent_at": 1767225600.25}')
    assert event.sent_at == 1767225600.25
    # Milliseconds (a common slip) are out of range and ignored, not misread as a far future.
    assert parse_event('{"keys": ["k"], "sent_at": 1767225600250}').sent_at is None


def test_the_namespace_defaults_to_default_and_travels_in_json() -> None:
    assert parse_event('{"keys": ["k"]}').namespace == "default"
    assert parse_event('{"keys": ["k"]}', namespace="orders").namespace == "orders"
    event = parse_event('{"keys": ["k"], "namespace": "orders"}', namespace="catalog")
    assert event == InvalidationEvent(keys=("k",), namespace="orders")
    assert parse_event(event.to_json()) == event
    assert "namespace" not in json.loads(InvalidationEvent(keys=("k",)).to_json())


@pytest.mark.parametrize("namespace", ['"Orders"', '""', "7", "null", '"a b"', f'"{"x" * 64}"'])
def test_a_bad_namespace_is_malformed(namespace: str) -> None:
    with pytest.raises(MalformedEvent, match="namespace must be a namespace's name"):
        parse_event(f'{{"keys": ["k"], "namespace": {namespace}}}')
