"""Settings: file, then CACHESVC_ environment, then flags (SPEC §1-§2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachesvc.config import ConfigError, load_settings


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "cachesvc.toml"
    path.write_text(
        '[server]\nport = 9000\n[[tiers]]\nurl = "memory://"\n[[tiers]]\nurl = "memory://"\n'
    )
    return path


def test_environment_overrides_the_file_and_flags_override_both(config_file: Path) -> None:
    settings = load_settings(config_file, {"CACHESVC_SERVER__PORT": "9100"})
    assert settings.server.port == 9100
    settings = load_settings(
        config_file, {"CACHESVC_SERVER__PORT": "9100"}, overrides={"server.port": 9200}
    )
    assert settings.server.port == 9200


def test_list_items_and_json_values_from_the_environment(config_file: Path) -> None:
    settings = load_settings(
        config_file, {"CACHESVC_TIERS__1__TTL": "42", "CACHESVC_TIERS__1__NAME": "slow"}
    )
    assert [(tier.name, tier.ttl) for tier in settings.tiers] == [("l1", 300), ("slow", 42)]
    settings = load_settings(None, {"CACHESVC_TIERS": '[{"url": "memory://", "ttl": 5}]'})
    assert len(settings.tiers) == 1 and settings.tiers[0].ttl == 5


def test_auth_token_short_form() -> None:
    settings = load_settings(None, {"CACHESVC_AUTH_TOKEN": "s3cret"})
    assert settings.server.auth_token is not None
    assert settings.server.auth_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_unknown_environment_keys_are_errors_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"CACHESVC_SERVER__PROT": "1"})
    assert caught.value.problems == ["server.prot: unknown key (from CACHESVC_SERVER__PROT)"]


def test_variables_that_are_not_settings_are_skipped() -> None:
    environ = {
        "CACHESVC_TEST_REDIS_URL": "redis://x",
        "CACHESVC_LOAD_KEYS": "100",
        "CACHESVC_CONFIG": "",
    }
    assert load_settings(None, environ).is_embedded_default


def test_journal_defaults_to_the_first_redis_tier() -> None:
    settings = load_settings(
        None,
        {
            "CACHESVC_TIERS": '[{"url": "memory://"}, {"url": "redis://127.0.0.1:1/3?prefix=x:"}]',
            "CACHESVC_INVALIDATION__URL": "redis://127.0.0.1:1/0",
        },
    )
    assert settings.write.journal_url == "redis://127.0.0.1:1/3"


def test_an_in_process_tier_over_shared_ones_needs_the_channel() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"CACHESVC_TIERS": '[{"url": "memory://"}, {"url": "redis://h/0"}]'})
    assert (
        "tiers[0].url: an in-process tier in front of shared tiers needs [invalidation].url"
        in str(refused.value)
    )
