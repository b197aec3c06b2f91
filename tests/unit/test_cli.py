"""The ``cachesvc`` command's help and its one-line answers to mistakes (issue 18)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cachesvc.cli import describe_journal, main
from cachesvc.config import load_settings


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal


def test_top_level_help_describes_the_service(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    assert "cachesvc is a caching sidecar" in text
    assert '"""' not in text and "``" not in text  # not a docstring
    for command in ("serve", "check-config", "invalidate", "dead-letters"):
        assert command in text
    assert "/openapi.json" in text


def test_serve_help_explains_the_embedded_default_and_the_variables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_text(capsys, "serve")
    assert "embedded default: one in-process memory tier named l1, on 127.0.0.1:8787" in text
    assert "CACHESVC_SERVER__PORT=9000" in text and "CACHESVC_TIERS__0__TTL=60" in text
    assert "CACHESVC_AUTH_TOKEN" in text and "CACHESVC_CONFIG" in text


def test_invalidate_help_says_the_options_repeat(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "invalidate")
    assert "[--key K]... [--prefix P]... [--tag T]..." in text
    assert "remove the key K (repeat for more keys)" in text
    assert "starts with P (repeat for more)" in text and "tag T (repeat for more)" in text


def test_dead_letters_help_says_what_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "dead-letters")
    assert "refused [write].max_attempts times" in text
    assert "--replay move every dead letter back into the journal" in text


def test_check_config_gives_the_hints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cachesvc.toml"
    path.write_text('[server]\nprot = 9000\n[[tiers]]\nurl = "rediss//cache:6380/0"\n')
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "config error: server.prot: unknown key; did you mean server.port?",
        "config error: tiers[0].url: 'rediss//cache:6380/0' is not a URL (known schemes: "
        "memcached, memory, postgres, postgresql, redis, redis-cluster, redis-sentinel, "
        "rediss); "
        "did you mean 'rediss://cache:6380/0'?",
    ]


def test_a_port_in_use_is_one_line_and_a_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            command = ["cachesvc", "serve", "--port", str(port), "--workers", workers]
            result = subprocess.run(
                [sys.executable, "-m", *command],
                capture_output=True,
                text=True,
                timeout=60,
                env={"PATH": "/usr/bin:/bin"},
            )
            assert result.returncode == 1
            assert result.stderr.splitlines() == [
                f"cachesvc: cannot listen on 127.0.0.1:{port}: the port is already in use "
                "(another cachesvc, or another program: choose another with --port or "
                "[server].port)"
            ]
            assert "Traceback" not in result.stdout + result.stderr


def test_the_journal_line_says_when_a_tier_shares_its_database() -> None:
    tiers = '[{"url": "memory://"}, {"url": "redis://cache:6379/0?prefix=app:"}]'
    channel = {"CACHESVC_INVALIDATION__URL": "redis://cache:6379/2"}
    shared = describe_journal(load_settings(None, {"CACHESVC_TIERS": tiers, **channel}))
    assert shared == (
        "stream cachesvc:journal on redis://cache:6379/0, the database of tier l2: a FLUSHDB "
        "of it deletes the journal too ([write].journal_url can move it)"
    )
    apart = {
        "CACHESVC_TIERS": tiers,
        "CACHESVC_WRITE__JOURNAL_URL": "redis://:pw@cache/1",
        **channel,
    }
    assert describe_journal(load_settings(None, apart)) == (
        "stream cachesvc:journal on redis://:***@cache/1"
    )
