"""Settings: file, then CACHESVC_ environment, then flags (docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachesvc.app import build_journal
from cachesvc.config import ConfigError, load_settings
from cachesvc.metrics import Metrics


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
    assert caught.value.problems == [
        "server.prot: unknown key (from CACHESVC_SERVER__PROT); did you mean CACHESVC_SERVER__PORT?"
    ]


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


@pytest.mark.parametrize(("top", "interval"), [("redis://127.0.0.1:1/2", 0.05), ("memory://", 0.0)])
def test_write_behind_gathers_writes_only_behind_a_shared_top_tier(
    top: str, interval: float
) -> None:
    """Peers of an in-process top tier read the tiers below: no wait before they get
    a write."""
    settings = load_settings(
        None,
        {
            "CACHESVC_TIERS": f'[{{"url": "{top}"}}, {{"url": "redis://127.0.0.1:1/3"}}]',
            "CACHESVC_INVALIDATION__URL": "redis://127.0.0.1:1/0",
        },
    )
    assert settings.write.flush_interval == 0.05
    journal = build_journal(settings, Metrics(), worker=0)
    assert journal is not None and journal.interval == interval


def test_an_in_process_tier_over_shared_ones_needs_the_channel() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"CACHESVC_TIERS": '[{"url": "memory://"}, {"url": "redis://h/0"}]'})
    assert (
        "tiers[0].url: an in-process tier in front of shared tiers needs [invalidation].url"
        in str(refused.value)
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cachesvc.toml"
    path.write_text(text)
    return path


def problems(path: Path | None, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return caught.value.problems


def test_indexed_tier_variables_apply_to_the_embedded_default_without_a_file() -> None:
    settings = load_settings(None, {"CACHESVC_TIERS__0__TTL": "60"})
    assert [(t.name, t.url, t.ttl) for t in settings.tiers] == [("l1", "memory://", 60)]
    settings = load_settings(None, {"CACHESVC_TIERS__0__URL": "redis://127.0.0.1:6379/0"})
    assert [(t.name, t.url) for t in settings.tiers] == [("l1", "redis://127.0.0.1:6379/0")]
    settings = load_settings(
        None,
        {
            "CACHESVC_TIERS__1__URL": "redis://127.0.0.1:6379/0",
            "CACHESVC_INVALIDATION__URL": "redis://127.0.0.1:6379/0",
        },
    )
    assert [t.url for t in settings.tiers] == ["memory://", "redis://127.0.0.1:6379/0"]


def test_indexed_tier_variables_apply_to_a_file_without_tiers(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 9000\n")
    settings = load_settings(path, {"CACHESVC_TIERS__0__TTL": "60"})
    assert [(t.url, t.ttl) for t in settings.tiers] == [("memory://", 60)]


def test_only_the_real_embedded_default_is_called_so(tmp_path: Path) -> None:
    assert load_settings(None, {}).is_embedded_default
    # Other sections from the environment leave the tiers as shipped.
    assert load_settings(None, {"CACHESVC_SERVER__PORT": "9000"}).is_embedded_default
    # The same single memory tier, but configured: by a file or by a tier variable.
    configured = load_settings(write(tmp_path, '[[tiers]]\nurl = "memory://"\n'), {})
    assert not configured.is_embedded_default
    assert configured.config_path == str(tmp_path / "cachesvc.toml")
    assert not load_settings(None, {"CACHESVC_TIERS__0__TTL": "60"}).is_embedded_default
    assert not load_settings(write(tmp_path, ""), {}).is_embedded_default


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nprot = 1\n", "server.prot: unknown key; did you mean server.port?"),
        ("[servr]\nport = 1\n", "servr: unknown key; did you mean server?"),
        (
            '[[tiers]]\nurl = "memory://"\nttll = 5\n',
            "tiers[0].ttll: unknown key; did you mean tiers[0].ttl?",
        ),
        (
            '[invalidation]\nchanel = "x"\n',
            "invalidation.chanel: unknown key; did you mean invalidation.channel?",
        ),
        ("[server]\nzzz = 1\n", "server.zzz: unknown key"),
    ],
)
def test_misspelt_keys_get_a_hint(tmp_path: Path, text: str, expected: str) -> None:
    assert problems(write(tmp_path, text)) == [expected]


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("rediss//cache.internal:6380/0", "did you mean 'rediss://cache.internal:6380/0'?"),
        ("redis:/127.0.0.1:6379/0", "did you mean 'redis://127.0.0.1:6379/0'?"),
        ("redis:127.0.0.1:6379", "did you mean 'redis://127.0.0.1:6379'?"),
        ("memcache://127.0.0.1:11211", "did you mean 'memcached://127.0.0.1:11211'?"),
        ("postgress://u@db/app", "did you mean 'postgres://u@db/app'?"),
        ("localhost:6379", "a URL starts with its scheme, e.g. 'redis://localhost:6379'"),
    ],
)
def test_url_slips_get_a_hint(tmp_path: Path, url: str, hint: str) -> None:
    (problem,) = problems(write(tmp_path, f'[[tiers]]\nurl = "{url}"\n'))
    assert problem.startswith("tiers[0].url: ") and problem.endswith(hint), problem


def test_url_slips_in_other_sections_get_a_hint(tmp_path: Path) -> None:
    text = '[invalidation]\nurl = "rediss//h:6380"\n[write]\njournal_url = "redi://h"\n'
    assert sorted(problems(write(tmp_path, text))) == [
        "invalidation.url: must be a redis://, rediss://, redis-cluster:// or redis-sentinel:// "
        "URL; did you mean 'rediss://h:6380'?",
        "write.journal_url: must be a redis://, rediss://, redis-cluster:// or redis-sentinel:// "
        "URL; did you mean 'redis://h'?",
    ]


def test_valid_urls_get_no_hint(tmp_path: Path) -> None:
    (problem,) = problems(write(tmp_path, '[[tiers]]\nurl = "http://example.com"\n'))
    assert "did you mean" not in problem and "unknown scheme 'http'" in problem


# -- namespaces and tokens --------------------------------------------------------------------

TWO_TIERS = '[[tiers]]\nurl = "memory://"\n[[tiers]]\nname = "slow"\nurl = "memory://"\n'
DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[namespaces]]\nname = "orders"\ntiers = ["l1", "l9"]\n',
            "namespaces[0].tiers[1]: unknown tier 'l9' (tiers: l1, slow)",
        ),
        (
            '[[namespaces]]\nname = "orders"\ntiers = ["l1", "l1"]\n',
            "namespaces[0].tiers[1]: tier 'l1' given twice",
        ),
        (
            '[[namespaces]]\nname = "a"\n[[namespaces]]\nname = "a"\n',
            "namespaces[1].name: duplicate namespace 'a'",
        ),
        (
            '[[namespaces]]\nname = "Orders"\n',
            "namespaces[0].name: 'Orders' is not a namespace name: 1-63 of a-z 0-9 _ -, "
            "starting with a letter or a digit",
        ),
        (
            '[[namespaces]]\nname = "default"\n',
            "namespaces[0].name: the namespace 'default' always exists and takes the "
            "top-level settings; it is not declared",
        ),
        (
            '[server]\nmax_body_bytes = 1000\n[[namespaces]]\nname = "a"\nmax_value_bytes = 1001\n',
            "namespaces[0].max_value_bytes: 1001 is over [server].max_body_bytes (1000): no "
            "request body may be that large",
        ),
        (
            f'[[tokens]]\nname = "t"\nsha256 = "{DIGEST}"\nscopes = ["orders:read"]\n',
            "tokens[0].scopes[0]: unknown namespace 'orders' (namespaces: default)",
        ),
        (
            f'[[tokens]]\nname = "t"\nsha256 = "{DIGEST}"\nscopes = ["*:read", "default:reed"]\n',
            "tokens[0].scopes[1]: 'default:reed' is not <namespace or *>:"
            "<read|write|invalidate|admin>",
        ),
        (
            '[[tokens]]\nname = "t"\nscopes = ["*:read"]\n',
            "tokens[0].secret_env: give secret_env (the environment variable holding the "
            "token) or sha256 (the token's SHA-256 digest, in hex)",
        ),
        (
            f'[[tokens]]\nname = "t"\nsecret_env = "T"\nsha256 = "{DIGEST}"\nscopes = ["*:read"]\n',
            "tokens[0].sha256: give secret_env or sha256, not both",
        ),
        (
            '[[tokens]]\nname = "t"\nsecret_env = "CACHESVC_T"\nscopes = ["*:read"]\n',
            "tokens[0].secret_env: variables starting with CACHESVC_ are settings; name "
            "another one",
        ),
        (
            '[[tokens]]\nname = "t"\nsecret_env = "A"\nscopes = ["*:read"]\n'
            '[[tokens]]\nname = "t"\nsecret_env = "B"\nscopes = ["*:read"]\n',
            "tokens[1].name: duplicate token name 't'",
        ),
        (
            '[server]\nauth_token = "x"\n'
            '[[tokens]]\nname = "auth_token"\nsecret_env = "A"\nscopes = ["*:read"]\n',
            "tokens[0].name: duplicate token name 'auth_token' (the name of [server].auth_token)",
        ),
        (
            '[[tokens]]\nname = "t"\nsecret_env = "A"\nscopes = ["*:read"]\nburst = 5\n',
            "tokens[0].burst: a burst needs a rate",
        ),
        (
            '[[invalidation.tables]]\nurl = "postgresql://u@h/d"\ntable = "users"\n'
            'keys = ["user:{id}"]\nnamespace = "orders"\n',
            "invalidation.tables[0].namespace: unknown namespace 'orders' (namespaces: default)",
        ),
    ],
)
def test_namespace_and_token_problems_name_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert problems(write(tmp_path, TWO_TIERS + text)) == [expected]


def test_every_namespace_and_token_problem_is_named_at_once(tmp_path: Path) -> None:
    text = (
        '[[namespaces]]\nname = "a"\ntiers = ["l7", "l1"]\nmax_value_bytes = 99999999\n'
        '[[namespaces]]\nname = "a"\n'
        '[[tokens]]\nname = "t"\nsecret_env = "A"\nscopes = ["b:read", "a:read"]\n'
    )
    assert problems(write(tmp_path, TWO_TIERS + text)) == [
        "namespaces[0].tiers[0]: unknown tier 'l7' (tiers: l1, slow)",
        "namespaces[0].max_value_bytes: 99999999 is over [server].max_body_bytes (1048576): "
        "no request body may be that large",
        "namespaces[1].name: duplicate namespace 'a'",
        "tokens[0].scopes[0]: unknown namespace 'b' (namespaces: a, default)",
    ]


def test_a_namespaces_tiers_keep_the_tier_order_and_tokens_come_from_the_environment(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, TWO_TIERS + '[[namespaces]]\nname = "orders"\ntiers = ["slow", "l1"]\n')
    tokens = '[{"name": "t", "secret_env": "T", "scopes": ["orders:write"], "rate": 5}]'
    settings = load_settings(path, {"CACHESVC_TOKENS": tokens})
    assert settings.namespaces[0].tiers == ["l1", "slow"]
    (token,) = settings.tokens
    assert (token.secret_env, token.scopes, token.rate) == ("T", ["orders:write"], 5)


def test_check_config_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cachesvc.cli import main

    path = write(tmp_path, TWO_TIERS + '[[namespaces]]\nname = "a"\ntiers = ["l7"]\n')
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "config error: namespaces[0].tiers[0]: unknown tier 'l7' (tiers: l1, slow)\n"
    )
