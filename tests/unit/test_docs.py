"""The project's own documentation: every link resolves inside the repository (files and
#anchors), no link leaves it except to a few well-known sites, and nothing a user reads
points at a contract outside it."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from cachesvc.cli import build_parser
from cachesvc.config import (
    AuditSettings,
    InvalidationSettings,
    NamespaceSettings,
    ServerSettings,
    TierSettings,
    TokenSettings,
    WriteSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted(
    {
        ROOT / "README.md",
        ROOT / "bench" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "deploy").glob("**/README.md"),
    }
)
# Plain links out of the repository are allowed to these sites only.
WELL_KNOWN_SITES = frozenset(
    (
        "github.com",
        "redis.io",
        "www.postgresql.org",
        "prometheus.io",
        "grafana.com",
        "kubernetes.io",
        "docs.docker.com",
        "www.rfc-editor.org",
        "docs.locust.io",
    )
)

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans, where brackets are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(path: Path) -> Iterator[str]:
    text = prose(path.read_text())
    yield from _INLINE_LINK.findall(text)
    yield from _REFERENCE.findall(text)


def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``: lower case, punctuation dropped
    (inline code and link syntax included), spaces as hyphens, repeats numbered."""
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        candidate, number = slug, 0
        while candidate in found:
            number += 1
            candidate = f"{slug}-{number}"
        found.add(candidate)
    return found


def document_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_documents_are_found() -> None:
    names = {document_id(path) for path in DOCUMENTS}
    assert {"README.md", "docs/configuration.md", "docs/http-api.md"} <= names
    assert "deploy/kubernetes/README.md" in names and "bench/README.md" in names


@pytest.mark.parametrize("document", DOCUMENTS, ids=document_id)
def test_every_link_resolves(document: Path) -> None:
    problems = []
    for target in links(document):
        parts = urlsplit(target)
        if parts.scheme in ("http", "https"):
            if parts.hostname not in WELL_KNOWN_SITES:
                problems.append(f"{target}: leaves the repository")
            continue
        if parts.scheme or parts.netloc:
            problems.append(f"{target}: not a link into the repository")
            continue
        linked = (document.parent / unquote(parts.path)).resolve() if parts.path else document
        if not linked.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not linked.exists():
            problems.append(f"{target}: no such file")
        elif parts.fragment and linked.suffix == ".md" and parts.fragment not in anchors(linked):
            problems.append(f"{target}: no heading #{parts.fragment} in {linked.name}")
    assert not problems, problems


def test_anchors_follow_githubs_rules(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title\n## `GET /v1/cache/{key}`\n## Locust: load-testing\n## A title\n")
    assert anchors(page) == {"a-title", "get-v1cachekey", "locust-load-testing", "a-title-1"}


def user_facing_texts() -> Iterator[tuple[str, str]]:
    for path in DOCUMENTS:
        yield document_id(path), path.read_text()
    for name in ("Dockerfile", "docker-compose.yml", "cachesvc/openapi.json", "LICENSE"):
        yield name, (ROOT / name).read_text()
    for path in sorted((ROOT / "deploy").glob("**/*")):
        if path.is_file():
            yield document_id(path), path.read_text()
    for command in ((), ("serve",), ("check-config",), ("invalidate",), ("dead-letters",)):
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--help"])
        yield " ".join(("cachesvc", *command, "--help")), help_text.getvalue()


def test_nothing_a_user_reads_points_outside_the_project() -> None:
    for name, text in user_facing_texts():
        assert not re.search(r"\bSPEC\b|shared/SPEC", text), name


def test_the_readme_shows_the_local_example_config() -> None:
    readme = (ROOT / "README.md").read_text()
    (shown,) = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    example = (ROOT / "deploy" / "local" / "cachesvc.toml").read_text()
    assert example.endswith(shown)
    header = example.removesuffix(shown).splitlines()
    assert all(line.startswith("#") or not line.strip() for line in header), header


def configuration_sections() -> dict[str, str]:
    """docs/configuration.md by its level-2 headings."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize(
    ("heading", "model"),
    [
        ("`[server]`", ServerSettings),
        ("`[[tiers]]`", TierSettings),
        ("`[write]`", WriteSettings),
        ("`[invalidation]`", InvalidationSettings),
        ("Namespaces", NamespaceSettings),
        ("Tokens and scopes", TokenSettings),
        ("`[audit]`", AuditSettings),
    ],
)
def test_every_key_is_in_the_configuration_reference(heading: str, model: type[Any]) -> None:
    table = configuration_sections()[heading]
    missing = [name for name in model.model_fields if f"| `{name}` |" not in table]
    assert not missing, f"docs/configuration.md, {heading}: {missing} not described"


def test_the_complete_file_shows_the_defaults(tmp_path: Path) -> None:
    (block,) = re.findall(
        r"```toml\n(.*?)```", configuration_sections()["A complete file"], re.DOTALL
    )
    path = tmp_path / "cachesvc.toml"
    path.write_text(block)
    settings = load_settings(path, environ={})
    assert settings.server == ServerSettings()
    assert settings.invalidation == InvalidationSettings()
    assert settings.write == WriteSettings(journal_url="redis://127.0.0.1:6379/0")
    assert settings.audit == AuditSettings()
    first = settings.tiers[0]
    defaults = TierSettings(url=first.url, name=first.name, ttl=first.ttl)
    assert first == defaults and first.ttl == TierSettings.model_fields["ttl"].default
