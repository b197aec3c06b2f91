"""Sidecars on separate hosts: each in a network namespace of its own, reaching Redis over
a veth link, one of whose links is cut (the interface down at both ends: no packet either
way, no reset) for 5 s while its peer deletes keys. From a second after the deletions,
the cut-off sidecar serves none of them, during the cut and after it.

Needs root (network namespaces); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.polling import until
from tests.servers import free_port
from tests.sidecar import Sidecar, tiers_config

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2's ip",
    ),
]

TOKEN = "netns-test-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=10)


class Host:
    """A network namespace linked to the root one by veth pairs: ``links`` maps a link's
    name to (root-side address, namespace-side address)."""

    def __init__(self, name: str, links: dict[str, int]) -> None:
        self.name = name
        self.links = {link: (f"10.77.{net}.1", f"10.77.{net}.2") for link, net in links.items()}

    def create(self) -> None:
        ip("netns", "add", self.name)
        ip("link", "set", "lo", "up", netns=self.name)
        for link, (outside, inside) in self.links.items():
            ip("link", "add", f"{link}0", "type", "veth", "peer", "name", f"{link}1")
            ip("link", "set", f"{link}1", "netns", self.name)
            ip("addr", "add", f"{outside}/24", "dev", f"{link}0")
            ip("addr", "add", f"{inside}/24", "dev", f"{link}1", netns=self.name)
            ip("link", "set", f"{link}0", "up")
            ip("link", "set", f"{link}1", "up", netns=self.name)

    def cut(self, link: str) -> None:
        ip("link", "set", f"{link}0", "down")
        ip("link", "set", f"{link}1", "down", netns=self.name)

    def mend(self, link: str) -> None:
        ip("link", "set", f"{link}0", "up")
        ip("link", "set", f"{link}1", "up", netns=self.name)

    def remove(self) -> None:
        for link in self.links:
            subprocess.run(["ip", "link", "del", f"{link}0"], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    suffix = str(os.getpid() % 10000)
    # The cut-off sidecar has two links: one to Redis (cut), one the test reaches it by.
    cut_off = Host(f"csa{suffix}", {f"cr{suffix}": 81, f"cc{suffix}": 82})
    peer = Host(f"csb{suffix}", {f"pr{suffix}": 83})
    try:
        for host in (cut_off, peer):
            host.create()
    except subprocess.CalledProcessError as exc:
        cut_off.remove()
        peer.remove()
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    yield cut_off, peer
    cut_off.remove()
    peer.remove()


@pytest.fixture
def redis_on_links() -> Iterator[int]:
    """A Redis in the root namespace on the links' root-side addresses."""
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="cachesvc-netns-redis-"))
    process = subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1 10.77.81.1 10.77.83.1",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
            "--dir", str(directory), "--protected-mode", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield port
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def config(redis: str) -> str:
    # Redis is the durable tier here: the namespaces reach no Postgres.
    return tiers_config("memory://", redis) + (
        f'[invalidation]\nurl = "{redis}"\nliveness_interval = 0.5\n'
    )


async def test_a_sidecar_cut_off_from_redis_serves_nothing_its_peer_deleted(
    hosts: tuple[Host, Host], redis_on_links: int
) -> None:
    cut_off_host, peer_host = hosts
    redis_link, client_link = list(cut_off_host.links)
    env = {"CACHESVC_AUTH_TOKEN": TOKEN}
    cut_off = Sidecar(
        config(f"redis://10.77.81.1:{redis_on_links}/0"),
        env,
        netns=cut_off_host.name,
        address=cut_off_host.links[client_link][1],
    )
    peer = Sidecar(
        config(f"redis://10.77.83.1:{redis_on_links}/0"),
        env,
        netns=peer_host.name,
        address=peer_host.links[f"pr{os.getpid() % 10000}"][1],
    )
    keys = [f"netns:{n}" for n in range(20)]
    with cut_off, peer:
        async with aiohttp.ClientSession(headers=HEADERS) as session:

            async def answer(sidecar: Sidecar, method: str, key: str) -> tuple[int, bytes]:
                async with session.request(
                    method,
                    f"{sidecar.url}/v1/cache/{key}",
                    data=b"old" if method == "PUT" else None,
                ) as response:
                    return response.status, await response.read()

            async def ready(sidecar: Sidecar) -> bool:
                async with session.get(f"{sidecar.url}/readyz") as response:
                    return response.status == 200

            await until(lambda: ready(cut_off), 10, "the cut-off sidecar ready")
            await until(lambda: ready(peer), 10, "the peer ready")
            for key in keys:
                assert (await answer(peer, "PUT", key))[0] == 204
                assert await answer(cut_off, "GET", key) == (200, b"old")  # in its l1
            await asyncio.to_thread(cut_off_host.cut, redis_link)
            deleted_at = time.monotonic()
            try:
                for key in keys:
                    assert (await answer(peer, "DELETE", key))[0] == 204
                stale: list[tuple[float, str]] = []
                while time.monotonic() - deleted_at < 5:
                    for key in keys:
                        started = time.monotonic()
                        _, body = await answer(cut_off, "GET", key)
                        if body == b"old" and started - deleted_at > 1.0:
                            stale.append((round(started - deleted_at, 2), key))
            finally:
                await asyncio.to_thread(cut_off_host.mend, redis_link)
            await until(lambda: ready(cut_off), 15, "the cut-off sidecar back")
            after = [await answer(cut_off, "GET", key) for key in keys]
    print(f"\n[faults] link to Redis cut 5 s: stale reads {len(stale)}, after: {set(after)}")
    assert stale == []
    assert all(status == 404 for status, _ in after)
