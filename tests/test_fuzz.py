"""A fuzz pass over the call-site validation and the decoding of stored rows (Hypothesis).

- A call with random arguments, options and task ids either raises the documented error at the
  call (``DispatchError``, or ``TypeError`` where plain Celery raises one) and stores nothing, or it
  is stored, and the relay's message builder turns the row into a message with the same arguments
  and options (as the JSON serializer delivers them: tuples arrive as lists, as with plain Celery).
- A stored row with a random payload, content type and encoding either decodes, or fails with
  kombu's ``DecodeError`` / ``ContentDisallowed``; it is never unpickled, and nothing else escapes.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import pickle
import string
from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.utils import json as kombu_json

from aftercommit import dispatch
from aftercommit.exceptions import DispatchError
from aftercommit.messages import Builder
from aftercommit.models import OutboxMessage
from tests.celery_app import app
from tests.support import HYPOTHESIS_DIR

pytestmark = pytest.mark.django_db

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=DirectoryBasedExampleDatabase(str(HYPOTHESIS_DIR / "examples")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@app.task(name="tests.test_fuzz.anything")
def anything(*args: Any, **kwargs: Any) -> None:
    """Takes any arguments, so Celery's own signature check leaves the fuzzing to aftercommit."""


# What a caller may pass ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
)
plain = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
odd = st.one_of(
    st.builds(object),
    st.binary(max_size=4),
    st.sets(st.integers(), max_size=2),
    st.complex_numbers(max_magnitude=10),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.uuids(),
)
values = st.one_of(plain, plain, odd, st.lists(st.one_of(plain, odd), max_size=3))
call_args = st.one_of(st.lists(values, max_size=4), st.tuples(values), values)
call_kwargs = st.one_of(
    st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=6), values, max_size=3),
    st.dictionaries(st.integers(), values, min_size=1, max_size=2),
    values,
)
dates = st.one_of(
    st.datetimes(timezones=st.none() | st.just(dt.timezone.utc)),
    st.datetimes(timezones=st.just(dt.timezone.utc)).map(dt.datetime.isoformat),
    st.text(max_size=12),
    st.integers(),
    st.floats(),
)
seconds = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.text(max_size=5), st.decimals(places=1)
)
unknown_keys = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10).filter(
    lambda key: (
        key not in dispatch.accepted_options(app) | dispatch.LOCAL_OPTIONS | dispatch.OWN_OPTIONS
    )
)
options = st.fixed_dictionaries(
    {},
    optional={
        "countdown": seconds,
        "eta": dates,
        "expires": st.one_of(seconds, dates),
        "priority": st.one_of(
            st.integers(-5, 300), st.booleans(), st.floats(), st.text(max_size=3)
        ),
        "headers": st.one_of(st.dictionaries(st.text(max_size=6), values, max_size=3), values),
        "queue": st.one_of(
            st.sampled_from(["celery", "other"]), st.text(max_size=8), st.integers()
        ),
        # (Ids the column cannot hold are a finding of their own: see the end of this file.)
        "task_id": st.one_of(
            st.text(max_size=255).filter(lambda text: "\x00" not in text),
            st.uuids().map(str),
            st.integers(),
        ),
    },
) | st.builds(lambda key, value: {key: value}, unknown_keys, values)


def as_delivered(value: Any) -> Any:
    """What the JSON serializer delivers for ``value`` (tuples become lists, and so on)."""
    return kombu_json.loads(kombu_json.dumps(value))


def same(a: Any, b: Any) -> bool:
    """Equal, counting NaN as equal to NaN."""
    return bool(kombu_json.dumps(a, sort_keys=True) == kombu_json.dumps(b, sort_keys=True))


# The call -----------------------------------------------------------------------------------------


@FUZZ
@given(args=call_args, kwargs=call_kwargs, options=options)
@example(args=["\x00", "\ud800"], kwargs={"k": "\x00"}, options={"headers": {"\x00": "\ud800"}})
@example(args="ab", kwargs={}, options={})
@example(args=[], kwargs={}, options={"countdown": math.nan})
@example(args=[], kwargs={}, options={"expires": "soon"})
def test_random_call__refused_at_the_call_or_delivered_intact(
    args: Any, kwargs: Any, options: dict[str, Any]
) -> None:
    before = OutboxMessage.objects.count()
    try:
        # A savepoint per example: a refused call must leave the caller's transaction usable.
        with transaction.atomic():
            result = anything.apply_async(args, kwargs, **options)
    except (DispatchError, TypeError):
        assert OutboxMessage.objects.count() == before, "a refused call stored its row"
        return
    row = OutboxMessage.objects.filter(task_id=result.id).latest("id")
    built = Builder(app).build(row)

    delivered_args, delivered_kwargs = dispatch.decode_arguments(row, app)
    assert same(delivered_args, as_delivered(list(args or ())))
    assert same(delivered_kwargs, as_delivered(dict(kwargs or {})))
    headers, _, body, _ = built.message
    assert same(list(body[0]), delivered_args) and same(body[1], delivered_kwargs)
    assert headers["id"] == (str(options["task_id"]) if options.get("task_id") else row.task_id)

    stored = dispatch.decode_options(row)
    for key in ("countdown", "eta", "expires", "priority", "headers", "queue"):
        if options.get(key) is not None:
            assert same(stored[key], as_delivered(options[key])), key
    if options.get("countdown") or options.get("eta") is not None:  # (countdown=0: now, as Celery)
        assert headers["eta"], "a countdown or eta was dropped"
    if options.get("expires") is not None:
        assert headers["expires"], "an expiry was dropped"
    if options.get("priority") is not None:
        assert built.options["priority"] == options["priority"]
    for key, value in (options.get("headers") or {}).items():
        assert same(built.options["headers"][key], as_delivered(value))


# A stored row -------------------------------------------------------------------------------------


class Planted:
    """A pickle that runs code when it is read."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ran, ())


def _ran() -> None:
    Planted.ran = True


content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/x-python-serialize",
            "application/x-yaml",
            "application/x-msgpack",
            "application/data",
            "text/plain",
        ]
    ),
    st.text(max_size=20),
)
encodings = st.one_of(st.sampled_from(["utf-8", "binary", "ascii", "latin-1"]), st.text(max_size=8))
json_payloads = st.recursive(scalars, lambda c: st.lists(c, max_size=3), max_leaves=6).map(
    kombu_json.dumps
)
pickles = st.builds(
    lambda value: base64.b64encode(pickle.dumps(value)).decode(),
    st.one_of(st.just(([Planted()], {})), st.just(Planted()), plain),
)
payloads = st.one_of(json_payloads, pickles, st.text(max_size=30))


def decode(payload: str, content_type: str, content_encoding: str) -> tuple[Any, Any]:
    row = OutboxMessage(
        task_id="fuzz",
        task_name=anything.name,
        payload=payload,
        content_type=content_type,
        content_encoding=content_encoding,
        options="{}",
    )
    return dispatch.decode_arguments(row, app)


@FUZZ
@given(payload=payloads, content_type=content_types, content_encoding=encodings)
def test_random_row__decodes_or_fails_cleanly_never_unpickled(
    payload: str, content_type: str, content_encoding: str
) -> None:
    Planted.ran = False
    try:
        args, kwargs = decode(payload, content_type, content_encoding)
    except (DecodeError, ContentDisallowed):
        pass
    else:
        assert isinstance(args, list) and isinstance(kwargs, dict)
        assert content_type in dispatch.allowed_content_types(app)
    assert not Planted.ran, "a stored pickle was unpickled"


@pytest.mark.parametrize(
    ("payload", "content_encoding"),
    [("0", "utf-8"), ('["ab", "cd"]', "utf-8"), ("[1, 2]", "utf-8"), ("0", "binary")],
)
def test_malformed_row__a_decode_error(payload: str, content_encoding: str) -> None:
    with pytest.raises(DecodeError):
        decode(payload, "application/json", content_encoding)


def test_pickle_row__refused_and_never_run() -> None:
    payload = base64.b64encode(pickle.dumps(([Planted()], {}))).decode()
    row = OutboxMessage(
        payload=payload, content_type="application/x-python-serialize", content_encoding="binary"
    )
    Planted.ran = False
    with pytest.raises(ContentDisallowed):
        dispatch.decode_arguments(row, app)
    assert not Planted.ran


def test_nan_and_infinity__survive_the_round_trip() -> None:
    # The one place where "equal" needs care in the property above; checked once by hand.
    with transaction.atomic():
        result = anything.apply_async([math.nan, math.inf], {})
    row = OutboxMessage.objects.get(task_id=result.id)
    args, _ = dispatch.decode_arguments(row, app)
    assert math.isnan(args[0]) and args[1] == math.inf


# Found by this fuzz: the column holds 255 characters and PostgreSQL text no NUL; such an id failed
# the INSERT with DataError and doomed the caller's transaction. Now refused at the call, on every
# database.
@pytest.mark.parametrize("task_id", ["x" * 256, "brand\x00-42"], ids=["256 characters", "NUL"])
def test_task_id_the_column_cannot_hold__refused_at_the_call(task_id: str) -> None:
    with transaction.atomic():
        with pytest.raises(DispatchError, match="task_id must be at most 255 characters"):
            anything.apply_async([], {}, task_id=task_id)
        assert OutboxMessage.objects.count() == 0  # the caller's transaction is still usable
