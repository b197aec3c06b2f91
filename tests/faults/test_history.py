"""A history check in the style of Jepsen's: three sidecars (real ``cachesvc serve``
processes) share one Redis, one memcached and one Postgres; twelve clients make concurrent
GETs, PUTs (every strategy), DELETEs, invalidations (keys, prefixes, tags) and bulk gets,
sets and deletes on thirty keys through any of them; every operation is recorded with its
interval and its answer; in the faulted runs, servers and a sidecar are broken on a
schedule (``faults``). Once the faults are healed and the
journal drained, every sidecar is read for every key, and ``tests.history.check`` judges
the whole history: no stale read more than 1 s after an acknowledged newer write, delete
or invalidation, sidecars agreeing, no value nobody wrote, no acknowledged write lost, one
ETag for one value.

Two topologies: an in-process memory tier on top of the shared ones (memory -> Redis ->
memcached -> Postgres) and the shared ones alone (Redis -> memcached -> Postgres); the
invalidation channel is on the Redis in both.

The cache Redis keeps nothing on disk, so the fault "Redis killed and restarted empty" is
real; the write-behind journal lives on a Redis of its own that persists every write
(``appendfsync always``), as the journal requires, so that no acknowledged write-behind
write may be lost. The third sidecar reaches both Redis servers through TCP proxies,
which the faulted run first blackholes (nothing comes back), then cuts (resets and
refusals), then restores.

After the history check come what it found, each reproduced on its own (all fixed). A
failing run names the reads, the operations they missed and, in the test's temporary
directory, the history and the sidecars' logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio

from cachesvc.envelope import Entry
from cachesvc.versions import version_at
from tests.conformance.conftest import TcpProxy
from tests.history import SLACK, Op, Report, check
from tests.polling import until
from tests.servers import (
    MemcachedServer,
    PostgresServer,
    RedisServer,
    flush_memcached,
    flush_redis,
)
from tests.sidecar import Sidecar, tiers_config

pytestmark = pytest.mark.faults

SIDECARS = 3
PARTITIONED = 2  # the sidecar whose links to Redis go through the proxies
CLIENTS = 12
KEYS = tuple(f"g{group}:{n}" for group in range(6) for n in range(5))
PREFIXES = tuple(f"g{group}:" for group in range(6))
TAGS = tuple(f"t{n}" for n in range(6))
STRATEGIES = ("write-through", "write-behind", "cache-aside")
JOURNAL_STREAM = "cachesvc:journal"
CLEAN_SECONDS = 15.0
FAULTED_SECONDS = 20.0
REQUEST_TIMEOUT = 5.0  # the client's: beyond the sidecar's own request_timeout (2 s)

# How long quiescing may take, from the documented bounds: a lost invalidation source is
# noticed within liveness_interval (1 s) and reconnected with backoff capped at 5 s; a tier
# breaker lets a probe through after breaker_reset (0.5 s here) and the monitor probes every
# 0.5 s; the journal's flusher retries with the same backoff.
READY_WITHIN = 10.0
DRAINED_WITHIN = 10.0
# Then the sidecars agree within an invalidation's second plus a monitor round.
AGREE_WITHIN = SLACK + 1.0

CACHE_TIER = "timeout = 0.25\nbreaker_failures = 3\nbreaker_reset = 0.5\n"
DURABLE_TIER = "breaker_failures = 3\nbreaker_reset = 0.5\n"


@dataclass
class Servers:
    redis: RedisServer  # the cache tier and the invalidation channel; no persistence
    journal: RedisServer  # the write-behind journal; appendfsync always
    memcached: MemcachedServer
    postgres: PostgresServer

    def heal(self) -> None:
        """Every server running and not stopped (after a run that failed half-way)."""
        for server in (self.redis, self.journal, self.memcached, self.postgres):
            server.resume()
            if not server.running:
                server.restart()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with (
        RedisServer(persistent=False) as cache_redis,
        RedisServer() as journal,
        MemcachedServer() as memcached,
        PostgresServer() as postgres,
    ):
        yield Servers(cache_redis, journal, memcached, postgres)


def sidecar_config(
    redis_url: str, journal_url: str, memcached_url: str, postgres_url: str, memory: bool
) -> str:
    tiers = []
    if memory:
        tiers.append('name = "memory"\nurl = "memory://"\nttl = 60\n')
    tiers += [
        f'name = "redis"\nurl = "{redis_url}"\nttl = 300\n{CACHE_TIER}',
        f'name = "memcached"\nurl = "{memcached_url}"\nttl = 3600\n{CACHE_TIER}',
        f'name = "postgres"\nurl = "{postgres_url}"\nttl = 86400\n{DURABLE_TIER}',
    ]
    return (
        "".join(f"[[tiers]]\n{tier}" for tier in tiers)
        + f'[write]\njournal_url = "{journal_url}"\njournal_stream = "{JOURNAL_STREAM}"\n'
        + "drain_timeout = 1\n"
        + f'[invalidation]\nurl = "{redis_url}"\n'
    )


@dataclass
class Recorder:
    """The history: every operation with its interval on one monotonic clock (seconds
    since the run began), and what broke when."""

    ops: list[Op] = field(default_factory=list)
    nemesis: list[tuple[float, str]] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.began

    def note(self, what: str) -> None:
        self.nemesis.append((self.now(), what))


@dataclass(frozen=True)
class Write:
    key: str
    value: bytes
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Request:
    """One HTTP request of a client. ``kind``: get, put, delete, invalidate, or bulk-get,
    bulk-set, bulk-delete (recorded as one get, put or delete per key)."""

    kind: str
    method: str
    path: str
    keys: tuple[str, ...] = ()  # the key (get, put, delete), keys (bulk, invalidate)
    writes: tuple[Write, ...] = ()  # put, bulk-set
    strategy: str = ""
    prefixes: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()  # invalidate
    json: Any = None

    @property
    def data(self) -> bytes | None:
        return self.writes[0].value if self.kind == "put" else None


async def perform(
    session: aiohttp.ClientSession,
    recorder: Recorder,
    process: str,
    sidecar: int,
    url: str,
    request: Request,
    final: bool = False,
) -> list[Op]:
    """Send ``request`` and record it: its start before sending, its end after the answer."""
    status: int | None = None
    body = b""
    headers: dict[str, str] = {}
    failure = ""
    start = recorder.now()
    try:
        async with session.request(
            request.method, url + request.path, data=request.data, json=request.json
        ) as response:
            body = await response.read()
            status = response.status
            headers = dict(response.headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        failure = repr(exc)  # no answer: the operation may or may not have happened
    end = recorder.now()
    ok = status is not None and 200 <= status < 300
    detail = failure or ("" if ok else body.decode(errors="replace")[:300])

    def op(kind: str, key: str = "", **fields: Any) -> Op:
        recorded = Op(
            len(recorder.ops), process, sidecar, kind, start, end,  # type: ignore[arg-type]
            fields.pop("status", status), key, final=final, detail=detail, **fields,
        )  # fmt: skip
        recorder.ops.append(recorded)
        return recorded

    kind = request.kind
    if kind == "get":
        [key] = request.keys
        value = body if status == 200 else b""
        return [
            op("get", key, value=value, etag=headers.get("ETag"), tier=headers.get("X-Cache-Tier"))
        ]
    if kind in ("put", "bulk-set"):
        versions = json.loads(body)["versions"] if kind == "bulk-set" and ok else {}
        return [
            op(
                "put",
                write.key,
                value=write.value,
                strategy=request.strategy,
                tags=write.tags,
                etag=f'"{versions[write.key]}"' if versions else headers.get("ETag"),
            )
            for write in request.writes
        ]
    if kind in ("delete", "bulk-delete"):
        return [op("delete", key) for key in request.keys]
    if kind == "bulk-get":
        if not ok:
            return [op("get", key) for key in request.keys]
        found = {entry["key"]: entry for entry in json.loads(body)["entries"]}
        return [
            op(
                "get",
                key,
                status=200,
                value=base64.b64decode(found[key]["value_base64"]),
                etag=f'"{found[key]["version"]}"',
                tier=found[key]["tier"],
            )
            if key in found
            else op("get", key, status=404)
            for key in request.keys
        ]
    return [op("invalidate", keys=request.keys, prefixes=request.prefixes, tags=request.tags)]


def get(key: str) -> Request:
    return Request("get", "GET", f"/v1/cache/{key}", keys=(key,))


def random_tags(rng: random.Random) -> tuple[str, ...]:
    return tuple(sorted(rng.sample(TAGS, rng.choice((0, 1, 1, 2)))))


def random_request(rng: random.Random, value: str) -> Request:
    """50% GET, 30% PUT (each strategy alike, 0-2 tags), 6% DELETE, 5% invalidations (by
    keys, a prefix or a tag), 9% bulk requests (get, set, delete of 2-3 keys)."""
    key = rng.choice(KEYS)
    draw = rng.random()
    if draw < 0.50:
        return get(key)
    if draw < 0.80:
        strategy = rng.choice(STRATEGIES)
        write = Write(key, value.encode(), random_tags(rng))
        query = f"?strategy={strategy}" + (f"&tags={','.join(write.tags)}" if write.tags else "")
        return Request("put", "PUT", f"/v1/cache/{key}{query}", (key,), (write,), strategy)
    if draw < 0.86:
        return Request("delete", "DELETE", f"/v1/cache/{key}", keys=(key,))
    if draw < 0.91:
        kind = rng.random()
        if kind < 0.4:
            keys = tuple(rng.sample(KEYS, rng.choice((1, 2))))
            return Request("invalidate", "POST", "/v1/invalidate", keys, json={"keys": [*keys]})
        if kind < 0.7:
            prefixes = (rng.choice(PREFIXES),)
            body = {"prefixes": [*prefixes]}
            return Request("invalidate", "POST", "/v1/invalidate", prefixes=prefixes, json=body)
        tags = (rng.choice(TAGS),)
        return Request("invalidate", "POST", "/v1/invalidate", tags=tags, json={"tags": [*tags]})
    keys = tuple(rng.sample(KEYS, rng.choice((2, 3))))
    if draw < 0.95:
        return Request("bulk-get", "POST", "/v1/bulk/get", keys, json={"keys": [*keys]})
    if draw < 0.98:
        strategy = rng.choice(STRATEGIES)
        writes = tuple(Write(k, f"{value}-{k}".encode(), random_tags(rng)) for k in keys)
        entries = [{"key": w.key, "value": w.value.decode(), "tags": [*w.tags]} for w in writes]
        document = {"strategy": strategy, "entries": entries}
        return Request("bulk-set", "POST", "/v1/bulk/set", keys, writes, strategy, json=document)
    return Request("bulk-delete", "POST", "/v1/bulk/delete", keys, json={"keys": [*keys]})


async def client(
    number: int,
    sidecars: list[Sidecar],
    session: aiohttp.ClientSession,
    recorder: Recorder,
    stop: asyncio.Event,
    run: str,
) -> None:
    rng = random.Random(f"{run}-{number}")
    process = f"c{number}"
    sequence = 0
    while not stop.is_set():
        sequence += 1
        request = random_request(rng, f"{run}-{process}-{sequence}")
        index = rng.randrange(len(sidecars))
        ops = await perform(session, recorder, process, index, sidecars[index].url, request)
        if ops[0].status is None:
            await asyncio.sleep(0.05)  # a sidecar that is down refuses at once: no spinning


async def faults(
    servers: Servers,
    sidecars: list[Sidecar],
    proxies: list[TcpProxy],
    recorder: Recorder,
) -> None:
    """The schedule of the faulted run (about 19 s): a sidecar is killed while Postgres is
    down, and takes a few seconds to start again while the schedule goes on."""
    began = time.monotonic()

    async def at(second: float, what: str, action: Callable[[], Any]) -> None:
        await asyncio.sleep(max(0.0, began + second - time.monotonic()))
        recorder.note(what)
        outcome = action()
        if isinstance(outcome, Awaitable):
            await outcome

    def in_thread(call: Callable[[], object]) -> Callable[[], Awaitable[object]]:
        return lambda: asyncio.to_thread(call)

    await at(2.0, "memcached hung (SIGSTOP)", in_thread(servers.memcached.hang))
    await at(4.5, "memcached resumed (SIGCONT)", in_thread(servers.memcached.resume))
    await at(5.5, "cache Redis killed (SIGKILL)", in_thread(servers.redis.kill))
    await at(7.0, "cache Redis restarted, empty", in_thread(servers.redis.restart))
    await at(8.0, "Postgres stopped (immediate)", in_thread(servers.postgres.stop_immediate))
    await at(9.5, "sidecar 1 killed (kill -9)", in_thread(sidecars[1].kill))
    await at(10.5, "Postgres started", in_thread(servers.postgres.restart))

    async def restart() -> None:
        await asyncio.to_thread(sidecars[1].start)
        recorder.note("sidecar 1 serving again")

    restarted = asyncio.ensure_future(at(11.5, "sidecar 1 restarting", restart))
    await at(14.5, f"sidecar {PARTITIONED}'s Redis links blackholed", lambda: _stall(proxies))
    await at(17.0, f"sidecar {PARTITIONED}'s Redis links cut", lambda: _stop(proxies))
    await at(18.5, f"sidecar {PARTITIONED}'s Redis links back", lambda: _start(proxies))
    await restarted


def _stall(proxies: list[TcpProxy]) -> None:
    for proxy in proxies:
        proxy.stall()


async def _stop(proxies: list[TcpProxy]) -> None:
    for proxy in proxies:
        await proxy.stop()


async def _start(proxies: list[TcpProxy]) -> None:
    for proxy in proxies:
        await proxy.start()


def http() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))


@contextlib.asynccontextmanager
async def proxy_to(url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A ``TcpProxy`` in front of the Redis at ``url``, and the URL that goes through it."""
    port = urlsplit(url).port
    assert port is not None
    proxy = TcpProxy("127.0.0.1", port)
    await proxy.start()
    try:
        yield proxy, f"redis://127.0.0.1:{proxy.port}/0"
    finally:
        await proxy.stop()


async def readiness(session: aiohttp.ClientSession, sidecar: Sidecar) -> tuple[int, Any]:
    try:
        async with session.get(sidecar.url + "/readyz") as response:
            return response.status, await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


async def quiesce(
    session: aiohttp.ClientSession, sidecars: list[Sidecar], journal_url: str
) -> list[str]:
    """Wait (polling, within the documented bounds) until every sidecar is ready and the
    journal is drained; what did not happen in time."""
    problems = []

    async def all_ready() -> bool:
        answers = await asyncio.gather(*(readiness(session, s) for s in sidecars))
        return all(status == 200 for status, _ in answers)

    try:
        await until(all_ready, READY_WITHIN, "every sidecar ready")
    except AssertionError as exc:
        answers = await asyncio.gather(*(readiness(session, s) for s in sidecars))
        problems.append(f"{exc}: {answers}")
    journal = redis.asyncio.Redis.from_url(journal_url)
    try:

        async def drained() -> bool:
            return bool(await journal.xlen(JOURNAL_STREAM) == 0)

        try:
            await until(drained, DRAINED_WITHIN, "the write-behind journal drained")
        except AssertionError as exc:
            problems.append(f"{exc}: {await journal.xlen(JOURNAL_STREAM)} entries left")
    finally:
        await journal.aclose()
    return problems


async def read_everything(
    session: aiohttp.ClientSession,
    sidecars: list[Sidecar],
    recorder: Recorder,
    final: bool = False,
) -> list[Op]:
    answers = await asyncio.gather(
        *(
            perform(session, recorder, "checker", index, sidecar.url, get(key), final)
            for index, sidecar in enumerate(sidecars)
            for key in KEYS
        )
    )
    return [op for ops in answers for op in ops]


async def until_agreed(
    session: aiohttp.ClientSession, sidecars: list[Sidecar], recorder: Recorder, after: float
) -> None:
    """Read every key from every sidecar until they agree and ``after`` has passed
    (within AGREE_WITHIN): these reads are part of the history too."""

    async def agreed() -> bool:
        answers: dict[str, set[tuple[int | None, bytes, str | None]]] = {}
        for op in await read_everything(session, sidecars, recorder):
            answers.setdefault(op.key, set()).add((op.status, op.value, op.etag))
        return recorder.now() > after and all(len(found) == 1 for found in answers.values())

    # Not in time: the final round tells which keys disagree, and the report counts them.
    with contextlib.suppress(AssertionError):
        await until(agreed, AGREE_WITHIN + max(0.0, after - recorder.now()), "sidecars agree")


def save(path: Path, recorder: Recorder, report: Report, sidecars: list[Sidecar]) -> None:
    """The history, the faults and each sidecar's log, for the post-mortem."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "history.jsonl", "w") as out:
        for op in recorder.ops:
            document = asdict(op)
            document["value"] = op.value.decode(errors="replace")
            out.write(json.dumps(document) + "\n")
    (path / "nemesis.txt").write_text(
        "".join(f"{when:8.3f} {what}\n" for when, what in recorder.nemesis)
    )
    (path / "report.txt").write_text(report.summary() + "\n\n" + report.details(limit=50))
    for index, sidecar in enumerate(sidecars):
        (path / f"sidecar{index}.log").write_text(sidecar.log)


@pytest.mark.parametrize("memory", [True, False], ids=["memory-on-top", "shared-tiers"])
@pytest.mark.parametrize("faulted", [False, True], ids=["clean", "faulted"])
async def test_history(servers: Servers, memory: bool, faulted: bool, tmp_path: Path) -> None:
    await asyncio.to_thread(servers.heal)
    for url in (servers.redis.url, servers.journal.url):
        flush_redis(url)
    flush_memcached(servers.memcached.url)
    run = uuid.uuid4().hex[:8]
    postgres_url = f"{servers.postgres.url}?table=history_{run}"
    async with (
        proxy_to(servers.redis.url) as (redis_proxy, proxied_redis),
        proxy_to(servers.journal.url) as (journal_proxy, proxied_journal),
    ):
        sidecars = []
        for index in range(SIDECARS):
            redis_url, journal_url = (
                (proxied_redis, proxied_journal)
                if index == PARTITIONED
                else (servers.redis.url, servers.journal.url)
            )
            config = sidecar_config(
                redis_url, journal_url, servers.memcached.url, postgres_url, memory
            )
            sidecars.append(Sidecar(config))
        try:
            await asyncio.gather(*(asyncio.to_thread(sidecar.start) for sidecar in sidecars))
            proxies = [redis_proxy, journal_proxy]
            recorder, quiesced_at, problems = await record(servers, sidecars, proxies, faulted, run)
        finally:
            for sidecar in sidecars:
                sidecar.close()

    report = check(recorder.ops, quiesced_at)
    statuses = Counter(f"{op.kind} {op.status}" for op in recorder.ops)
    print(
        f"\n{'faulted' if faulted else 'clean'} run, "
        f"{'memory on top' if memory else 'shared tiers only'}: {report.summary()}\n"
        f"answers: {dict(sorted(statuses.items()))}\n"
        + "".join(f"{when:7.2f} s  {what}\n" for when, what in recorder.nemesis)
    )
    if report.violations or problems:
        save(tmp_path / "history", recorder, report, sidecars)
        print(f"history, faults and logs in {tmp_path / 'history'}\n{report.details()}")
    assert problems == []
    assert report.violations == 0, report.summary()


async def record(
    servers: Servers, sidecars: list[Sidecar], proxies: list[TcpProxy], faulted: bool, run: str
) -> tuple[Recorder, float, list[str]]:
    """The clients' load (with the faults, if ``faulted``), then quiescing and the final
    round of reads: the history, when it quiesced, and what did not happen in time."""
    recorder = Recorder()
    async with http() as session:
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(client(n, sidecars, session, recorder, stop, run))
            for n in range(CLIENTS)
        ]
        if faulted:
            try:
                await faults(servers, sidecars, proxies, recorder)
            finally:
                await asyncio.to_thread(servers.heal)
        seconds = FAULTED_SECONDS if faulted else CLEAN_SECONDS
        await asyncio.sleep(max(0.0, seconds - recorder.now()))  # the load's duration
        stop.set()
        await asyncio.gather(*clients)
        recorder.note("load stopped")
        last_end = max(op.end for op in recorder.ops)
        problems = await quiesce(session, sidecars, servers.journal.url)
        quiesced_at = recorder.now()
        recorder.note("quiesced" + "".join(f"; {problem}" for problem in problems))
        await until_agreed(session, sidecars, recorder, after=last_end + SLACK)
        await read_everything(session, sidecars, recorder, final=True)
    return recorder, quiesced_at, problems


# -- what the history check found, each on its own -----------------------------------------


async def answer(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None
) -> tuple[int, bytes, str | None]:
    """Status, body and X-Cache-Tier."""
    async with session.request(method, url, data=body) as response:
        return response.status, await response.read(), response.headers.get("X-Cache-Tier")


def channel_on(redis_url: str) -> str:
    return f'[invalidation]\nurl = "{redis_url}"\n'


def redis_then(postgres_url: str) -> Callable[[str], str]:
    """The config of Redis -> Postgres for a Redis URL."""
    return lambda redis_url: tiers_config(redis_url, postgres_url)


@contextlib.asynccontextmanager
async def peer_and_cut_off(
    redis_url: str, config: Callable[[str], str]
) -> AsyncIterator[tuple[TcpProxy, Sidecar, Sidecar]]:
    """Two sidecars configured by ``config(redis_url)``: the second reaches Redis through
    a proxy (the test cuts it)."""
    async with proxy_to(redis_url) as (proxy, proxied):
        with Sidecar(config(redis_url)) as peer, Sidecar(config(proxied)) as cut_off:
            yield proxy, peer, cut_off


async def until_ready(session: aiohttp.ClientSession, sidecar: Sidecar) -> None:
    async def ready() -> bool:
        return (await readiness(session, sidecar))[0] == 200

    await until(ready, READY_WITHIN, f"{sidecar.url} ready")


async def a_peer_overwrites_what_was_written_behind(
    redis_url: str, postgres_url: str, left_in_journal: int = 0
) -> None:
    """Ten keys written behind through one sidecar, each flushed (the journal down to
    ``left_in_journal`` entries) before the next: which sidecar flushes a write is the
    journal's choice, so its peer flushes some. Then the peer writes them all cache-aside,
    and the writer must serve the peer's values. (The writer reads first: a peer's read
    would promote them into the top tier, where the writer would find them before its
    overlay.)"""
    config = tiers_config(redis_url, postgres_url)
    keys = [f"/v1/cache/k{n}" for n in range(10)]
    journal = redis.asyncio.Redis.from_url(redis_url)

    async def flushed() -> bool:
        return bool(await journal.xlen(JOURNAL_STREAM) == left_in_journal)

    with Sidecar(config) as writer, Sidecar(config) as peer:
        async with http() as session:
            try:
                for path in keys:
                    put = writer.url + path + "?strategy=write-behind"
                    assert (await answer(session, "PUT", put, b"v1"))[0] == 202
                    await until(flushed, 5.0, "the write-behind write flushed")
            finally:
                await journal.aclose()
            for path in keys:
                put = peer.url + path + "?strategy=cache-aside"
                assert (await answer(session, "PUT", put, b"v2"))[0] == 204

            async def writer_serves_v2() -> bool:
                answers = [await answer(session, "GET", writer.url + path) for path in keys]
                return all(body == b"v2" for _, body, _ in answers)

            await until(writer_serves_v2, 5.0, "the writer serves the peer's newer values")


async def test_a_flushed_write_behind_value_gives_way_to_a_peers_newer_write(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    """The clean run without memory tiers: a sidecar's write-behind value, flushed by a
    peer, kept being served by that sidecar (labelled with its top tier's name) after a
    peer's newer cache-aside write, while the peers answered the newer state: its overlay
    of unflushed writes was never dropped once the journal had been seen empty."""
    await a_peer_overwrites_what_was_written_behind(clean_redis_url, clean_postgres_url)


async def test_a_pending_entry_of_a_dead_peer_does_not_keep_write_behind_values_alive(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    """The faulted run without memory tiers: a sidecar served its own write-behind value
    (labelled with its top tier's name) 1.2-1.3 s after a peer's newer cache-aside write,
    its Redis unreachable. The overlay of unflushed writes is dropped once
    ``Journal.applied`` says the stream's oldest entry is past it, and an entry delivered to
    a consumer that died (here: "ghost") stays oldest until it restarts or ``reclaim_after``
    (30 s) passes; peers without in-process tiers announce no writes, so nothing else drops
    it."""
    journal = redis.asyncio.Redis.from_url(clean_redis_url)
    try:
        await journal.xgroup_create(JOURNAL_STREAM, "cachesvc-flushers", id="0", mkstream=True)
        envelope = Entry(b"ghost", "text/plain", version_at(time.time()), None).encode()
        await journal.xadd(JOURNAL_STREAM, {b"k": b"ghost", b"p": envelope})
        ghost = await journal.xreadgroup("cachesvc-flushers", "ghost", {JOURNAL_STREAM: ">"})
        assert ghost
    finally:
        await journal.aclose()
    await a_peer_overwrites_what_was_written_behind(
        clean_redis_url, clean_postgres_url, left_in_journal=1
    )


@pytest.mark.parametrize("operation", ["delete", "put"])
async def test_what_a_cut_off_sidecar_applied_reaches_the_peers_memory_tiers(
    clean_redis_url: str, clean_postgres_url: str, operation: str
) -> None:
    """The faulted run with memory tiers: a sidecar whose link to Redis is cut applies a
    DELETE (or a write) to the durable tier, cannot tell its peers (503: "applied here, but
    the peer sidecars were not told"), and nobody tells them later: once the link is back,
    the peers' memory tiers go on serving the old value (for their ttl) while the sidecar
    itself, and any peer without a copy, answers the new state. Either outcome of the 503
    will do (done everywhere, or nowhere); the sidecars must agree on it."""

    def config(redis_url: str) -> str:
        return tiers_config("memory://", redis_url, clean_postgres_url) + channel_on(redis_url)

    async with (
        peer_and_cut_off(clean_redis_url, config) as (proxy, peer, cut_off),
        http() as session,
    ):
        url = "/v1/cache/k"
        assert (await answer(session, "PUT", peer.url + url, b"v1"))[0] == 204
        assert await answer(session, "GET", peer.url + url) == (200, b"v1", "l1")

        await proxy.stop()
        if operation == "delete":
            status, body, _ = await answer(session, "DELETE", cut_off.url + url)
        else:
            status, body, _ = await answer(session, "PUT", cut_off.url + url, b"v2")
        assert status == 503, body
        await proxy.start()
        await until_ready(session, cut_off)

        async def agreed() -> bool:
            answers = [await answer(session, "GET", s.url + url) for s in (peer, cut_off)]
            return len({(status, body) for status, body, _ in answers}) == 1

        await until(agreed, AGREE_WITHIN, "the peer serves what the cut-off sidecar serves")


async def test_a_write_a_cut_off_sidecar_could_not_put_in_redis_is_not_hidden_by_it(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    """The faulted run without memory tiers: a sidecar cut off from the shared Redis
    writes through to the durable tier (the cache tier it cannot reach is skipped, and the
    key remembered as missed, in its own memory and record); its peers, whose Redis is
    fine, go on serving the older value from Redis until the link is back and the cut-off
    sidecar repairs the key: for as long as the partition lasts (the documented window is
    "one monitor round after the tier's recovery", which assumes the tier was down for
    everyone)."""
    async with (
        peer_and_cut_off(clean_redis_url, redis_then(clean_postgres_url)) as (proxy, peer, cut_off),
        http() as session,
    ):
        url = "/v1/cache/k"
        assert (await answer(session, "PUT", peer.url + url, b"v1"))[0] == 204
        assert await answer(session, "GET", peer.url + url) == (200, b"v1", "l1")
        await proxy.stop()
        assert (await answer(session, "PUT", cut_off.url + url, b"v2"))[0] == 204

        async def peer_serves_v2() -> bool:
            return (await answer(session, "GET", peer.url + url))[1] == b"v2"

        await until(peer_serves_v2, AGREE_WITHIN, "the peer serves the newer value")


async def test_an_invalidation_acknowledged_while_postgres_is_down_holds_for_new_sidecars(
    clean_redis_url: str, postgres_server: PostgresServer
) -> None:
    """A prefix invalidation answered 202 while the durable tier (the markers' store) is
    down lives in the memory of the running sidecars only, until the one that made it saves
    it; killed before that, it is gone for every sidecar that starts later."""
    config = tiers_config(clean_redis_url, postgres_server.url) + channel_on(clean_redis_url)
    with Sidecar(config) as peer, Sidecar(config) as invalidator:
        async with http() as session:
            url = "/v1/cache/p:1"
            assert (await answer(session, "PUT", peer.url + url, b"v1"))[0] == 204
            await asyncio.to_thread(postgres_server.stop_immediate)
            status, body, _ = await answer(
                session, "POST", invalidator.url + "/v1/invalidate", b'{"prefixes": ["p:"]}'
            )
            invalidator.kill()
            await asyncio.to_thread(postgres_server.restart)
            if status == 503:
                return  # not acknowledged: nothing was promised
            assert status == 202, body
            assert (await answer(session, "GET", peer.url + url))[0] == 404
            with Sidecar(config) as newcomer:
                assert (await answer(session, "GET", newcomer.url + url))[0] == 404


async def test_a_tag_invalidation_hides_no_newer_untagged_value_below_a_stale_one(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    """The faulted run without memory tiers: a peer answered 404 for a key whose newest
    write (no tags) was in Postgres. Redis held an older value with tag t (the newer write
    came from a sidecar cut off from Redis); invalidating t hid that older value, and the
    read then hid everything below it up to the invalidation's version, not the hidden
    entry's: the newer value, which never had the tag, too."""
    async with (
        peer_and_cut_off(clean_redis_url, redis_then(clean_postgres_url)) as (proxy, peer, cut_off),
        http() as session,
    ):
        url = "/v1/cache/k"
        assert (await answer(session, "PUT", peer.url + url + "?tags=t", b"v1"))[0] == 204
        await proxy.stop()
        assert (await answer(session, "PUT", cut_off.url + url, b"v2"))[0] == 204
        invalidate = peer.url + "/v1/invalidate"
        assert (await answer(session, "POST", invalidate, b'{"tags": ["t"]}'))[0] == 202
        assert await answer(session, "GET", peer.url + url) == (200, b"v2", "l2")


async def test_a_tag_invalidation_still_hides_the_older_values_below_a_tagged_one(
    clean_redis_url: str, clean_memcached_url: str, postgres_server: PostgresServer
) -> None:
    """The other side of the rule above (issue 11, item 3): v1 without tags in every
    tier, then, Postgres down, v2 with tag t written behind (in Redis only); invalidating t
    hides v2, and v1 below it with it (read from a peer, which has no overlay of v2)."""
    tiers = tiers_config(clean_redis_url, clean_memcached_url, postgres_server.url)
    config = tiers + channel_on(clean_redis_url)
    with Sidecar(config) as writer, Sidecar(config) as peer:
        async with http() as session:
            url = "/v1/cache/k"
            assert (await answer(session, "PUT", writer.url + url, b"v1"))[0] == 204
            await asyncio.to_thread(postgres_server.stop_immediate)
            put = writer.url + url + "?strategy=write-behind&tags=t"
            assert (await answer(session, "PUT", put, b"v2"))[0] == 202
            assert await answer(session, "GET", peer.url + url) == (200, b"v2", "l1")
            invalidate = writer.url + "/v1/invalidate"
            # Told and applied, but with Postgres down its marker is not kept yet: 503.
            assert (await answer(session, "POST", invalidate, b'{"tags": ["t"]}'))[0] == 503

            async def hidden() -> tuple[int, bytes, str | None] | None:
                found = await answer(session, "GET", peer.url + url)
                return None if found[1] == b"v2" else found  # the event on its way

            answered = await until(hidden, SLACK, "the peer applies the event")
            assert answered is not None
            assert answered[0] in (404, 503), answered  # 503: only Postgres could say


async def test_a_blind_sidecar_sees_a_peers_prefix_invalidation_within_a_second(
    clean_redis_url: str, clean_postgres_url: str
) -> None:
    """Found on main merged with this branch (the faulted run without memory tiers): a
    sidecar whose link to Redis is blackholed reads the durable tier only, checked against
    markers it reloads every liveness_interval; it served prefix- and tag-invalidated values
    2 s after a peer's invalidation. The upkeep loop that reloads them also renews the
    applier lease in the channel's Redis, which a blackholed link holds for the client's
    socket timeout (2 s) every round: reloads every 3 s instead of every second."""

    def config(redis_url: str) -> str:
        return tiers_config(redis_url, clean_postgres_url) + channel_on(redis_url)

    async with peer_and_cut_off(clean_redis_url, config) as (proxy, peer, blind), http() as session:
        proxy.stall()

        async def reads_durable_only() -> bool:
            return "reads" in (await readiness(session, blind))[1]

        await until(reads_durable_only, READY_WITHIN, "the blackholed sidecar reads Postgres only")

        async def hidden(url: str) -> bool:
            return (await answer(session, "GET", blind.url + url))[0] == 404

        # Twice: the second invalidation right after the first was seen, so just after a
        # reload, has a whole period of the loop to wait.
        for prefix in ("p:", "q:"):
            url = f"/v1/cache/{prefix}1"
            assert (await answer(session, "PUT", peer.url + url, b"v1"))[0] == 204
            invalidate = peer.url + "/v1/invalidate"
            body = json.dumps({"prefixes": [prefix]}).encode()
            assert (await answer(session, "POST", invalidate, body))[0] == 202
            await until(partial(hidden, url), AGREE_WITHIN, f"the blind sidecar hides {url}")
