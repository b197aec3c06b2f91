"""The test helpers (and the benchmarks, which use them) leave nothing in the temp
directory: no ``cachesvc-*`` folder outlives its sidecar or server."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.servers import RedisServer
from tests.sidecar import Sidecar


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temp directory of this test's own, so that what is left in it can be seen."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_sidecar_deletes_its_folder_and_keeps_its_log(temp_dir: Path) -> None:
    with Sidecar() as sidecar:
        assert sidecar.dir.parent == temp_dir and sidecar.dir.name.startswith("cachesvc-")
    assert list(temp_dir.iterdir()) == []
    assert "serving on" in sidecar.log


def test_a_sidecar_that_fails_to_start_deletes_its_folder(temp_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="sidecar exited"), Sidecar("[server]\nprot = 1\n"):
        pass
    assert list(temp_dir.iterdir()) == []


def test_a_server_deletes_its_folder(temp_dir: Path) -> None:
    with RedisServer() as server:
        assert server.dir.parent == temp_dir
    assert list(temp_dir.iterdir()) == []
