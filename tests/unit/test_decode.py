"""The relay reads every stored call back: a text with no kombu type marker takes the plain JSON
decoder. Whatever the arguments, the values (and the error for a broken text) are kombu's."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import serialization
from kombu.exceptions import DecodeError
from kombu.utils import json as kombu_json

from aftercommit.dispatch import _loads

ACCEPT = frozenset({"application/json"})

_leaves = (
    st.text()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | st.datetimes(timezones=st.just(dt.timezone.utc))
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None, database=None)
@given(args=st.lists(_values, max_size=4), kwargs=st.dictionaries(st.text(), _values, max_size=4))
def test_kombu_contract__stored_arguments_decoded_as_kombu_decodes_them(
    args: list[Any], kwargs: dict
) -> None:
    text = kombu_json.dumps((args, kwargs))
    kombus = serialization.loads(text, "application/json", "utf-8", accept=ACCEPT)
    ours = _loads(text, "application/json", "utf-8", ACCEPT)
    assert ours == kombus
    assert repr(ours) == repr(kombus)  # the same types too (a datetime stays a datetime)


def test_plain_text_takes_the_plain_decoder__a_marker_does_not(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """(The property above could pass with the shortcut never taken.)"""
    calls: list[str] = []
    real = serialization.loads
    monkeypatch.setattr(
        serialization, "loads", lambda data, *a, **k: calls.append(data) or real(data, *a, **k)
    )
    assert _loads('[["a", 1], {}]', "application/json", "utf-8", ACCEPT) == [["a", 1], {}]
    assert calls == []
    marked = kombu_json.dumps(([dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)], {}))
    assert _loads(marked, "application/json", "utf-8", ACCEPT)[0][0].year == 2030
    escaped = '[["\\u005f_type__"], {}]'
    _loads(escaped, "application/json", "utf-8", ACCEPT)
    assert calls == [marked, escaped]


@pytest.mark.parametrize("text", ['[["a", 1], {}', "not json", '{"a": }'])
def test_kombu_contract__broken_text__kombus_decode_error(text: str) -> None:
    with pytest.raises(DecodeError) as kombus:
        serialization.loads(text, "application/json", "utf-8", accept=ACCEPT)
    with pytest.raises(DecodeError) as ours:
        _loads(text, "application/json", "utf-8", ACCEPT)
    assert str(ours.value) == str(kombus.value)


def test_bytes__kombus_path() -> None:
    assert _loads(b"[[1], {}]", "application/json", "utf-8", ACCEPT) == [[1], {}]
