"""conf: defaults, validation with errors that name the key and the fix, and the cache's reset."""

from __future__ import annotations

import pytest
from django.test import override_settings

from aftercommit.conf import SETTINGS, Settings, settings
from aftercommit.exceptions import ImproperlyConfigured


def values(raw: object) -> Settings:
    fresh = Settings()
    with override_settings(AFTERCOMMIT=raw):
        fresh._values()
    return fresh


def test_no_setting__every_key_has_its_default() -> None:
    with override_settings(AFTERCOMMIT=None):
        for name, spec in SETTINGS.items():
            assert getattr(settings, name) == spec.default


def test_a_key_given__overrides_its_default_only() -> None:
    with override_settings(AFTERCOMMIT={"LEASE": 5}):
        assert settings.LEASE == 5
        assert SETTINGS["BATCH_SIZE"].default == settings.BATCH_SIZE


def test_unknown_key__error_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(
        ImproperlyConfigured, match=r"Unknown key\(s\).*LEAS\b.*Known keys: .*LEASE"
    ):
        values({"LEAS": 5})


def test_removed_key__error_says_why_and_to_delete_it() -> None:
    with pytest.raises(ImproperlyConfigured, match=r"GRACE_PERIOD was removed in 0\.2.*Delete it"):
        values({"GRACE_PERIOD": 2})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"LEASE": "60"}, r"\['LEASE'\] must be int or float, got '60'"),
        ({"BATCH_SIZE": True}, r"\['BATCH_SIZE'\] must be int, got True"),
        ({"BATCH_SIZE": 2.5}, r"\['BATCH_SIZE'\] must be int"),
        ({"GUARD": "loud"}, r"\['GUARD'\] must be one of 'off', 'warn', 'raise', got 'loud'"),
        ({"LEASE": 0.5}, r"\['LEASE'\] must be at least 1"),
        ({"MAX_ATTEMPTS": 0}, r"\['MAX_ATTEMPTS'\] must be at least 1"),
        ({"RELAY_IN_WORKER": 1}, r"\['RELAY_IN_WORKER'\] must be bool"),
    ],
)
def test_wrong_value__error_names_the_key_and_what_it_expects(raw: dict, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        values(raw)


def test_not_a_dict__error_says_so() -> None:
    with pytest.raises(ImproperlyConfigured, match="must be a dict, not list"):
        values([("LEASE", 5)])


def test_setting_changed__the_next_read_sees_the_new_value() -> None:
    with override_settings(AFTERCOMMIT={"BATCH_SIZE": 7}):
        assert settings.BATCH_SIZE == 7
        with override_settings(AFTERCOMMIT={"BATCH_SIZE": 8}):
            assert settings.BATCH_SIZE == 8
        assert settings.BATCH_SIZE == 7


def test_same_dict__validated_once() -> None:
    with override_settings(AFTERCOMMIT={"BATCH_SIZE": 7}):
        assert settings.BATCH_SIZE == 7
        first = settings._checked
        assert SETTINGS["LEASE"].default == settings.LEASE
        assert settings._checked is first


def test_unknown_attribute__attribute_error() -> None:
    with pytest.raises(AttributeError):
        settings.NOT_A_SETTING  # noqa: B018
