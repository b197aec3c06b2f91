"""Load-test a cachesvc deployment with Locust: ``locust -f bench/locustfile.py``.

Each user reads and writes keys picked from a Zipf distribution (a few hot keys, a long
tail), with the mix, value sizes and write strategy set by environment variables (see
bench/workload.py; defaults: 10,000 keys, s = 1.0, 90 % reads, 256-byte values,
write-through, the namespace ``default``)::

    CACHESVC_LOAD_KEYS=100000 CACHESVC_LOAD_ZIPF_S=1.1 CACHESVC_LOAD_READ_RATIO=0.95 \\
    CACHESVC_LOAD_VALUE_SIZE=100-4000 CACHESVC_LOAD_STRATEGY=write-through,write-behind \\
    CACHESVC_LOAD_NAMESPACE=orders CACHESVC_LOAD_TOKEN=$ORDERS_API_TOKEN \\
    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8787 --csv out

Locust's statistics are split by operation and by the tier that answered: ``GET [l1]``,
``GET [l2]``, ``GET [miss]`` (a 404 is a cache miss, not a failure), ``PUT write-through``,
``PUT write-behind``... Tasks are tagged ``get`` and ``put``: ``--tags get`` runs reads only.
Any other status, or a tier header missing on a hit, is a failure.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import quote

from locust import FastHttpUser, tag

try:
    from bench.workload import Values, Workload, ZipfSampler
except ModuleNotFoundError:
    # Locust puts the locustfile's own folder on sys.path, not the repository: run from
    # elsewhere (or copied with workload.py beside it), the sibling module is found so.
    from workload import Values, Workload, ZipfSampler  # type: ignore[no-redef]

WORKLOAD = Workload.from_env()
# Ranks shuffled onto key numbers, so the hot keys are spread over the key space (and
# over memcached nodes and Redis cluster slots) rather than being keys 0, 1, 2...
_KEY_OF_RANK = random.Random(0).sample(range(WORKLOAD.keys), WORKLOAD.keys)
_READS = round(WORKLOAD.read_ratio * 1000)


def _describe(response: Any) -> str:
    # Status 0: no answer at all (refused, reset, timed out); the client's error says why.
    if response.status_code == 0:
        return f"no answer: {response.error!r}"
    return f"status {response.status_code}: {(response.text or '')[:200]}"


class CacheUser(FastHttpUser):
    """One client of the sidecar: a closed loop with no think time (``-u`` sets the
    concurrency)."""

    def on_start(self) -> None:
        self.rng = random.Random()
        self.sampler = ZipfSampler(WORKLOAD.keys, WORKLOAD.zipf_s, self.rng)
        self.values = Values(WORKLOAD.value_size, self.rng)
        self.headers = WORKLOAD.headers()

    def key(self) -> str:
        number = _KEY_OF_RANK[self.sampler.sample()]
        return quote(f"{WORKLOAD.key_prefix}{number}", safe="")

    @tag("get")
    def get(self) -> None:
        with self.client.get(
            f"{WORKLOAD.cache_path}{self.key()}",
            headers=self.headers,
            name="GET",
            catch_response=True,
        ) as response:
            if response.status_code == 200:
                tier = response.headers.get("X-Cache-Tier")
                response.request_meta["name"] = f"GET [{tier or '?'}]"
                if tier:
                    response.success()
                else:
                    response.failure("200 without an X-Cache-Tier header")
            elif response.status_code == 404:
                response.request_meta["name"] = "GET [miss]"
                response.success()
            else:
                response.failure(_describe(response))

    @tag("put")
    def put(self) -> None:
        strategy = self.rng.choice(WORKLOAD.strategies)
        expected = 202 if strategy == "write-behind" else 204
        headers: dict[str, Any] = {**self.headers, "Content-Type": "application/octet-stream"}
        with self.client.put(
            f"{WORKLOAD.cache_path}{self.key()}?strategy={strategy}",
            data=self.values.next(),
            headers=headers,
            name=f"PUT {strategy}",
            catch_response=True,
        ) as response:
            if response.status_code == expected:
                response.success()
            else:
                response.failure(_describe(response))

    # Weights in thousandths (CACHESVC_LOAD_READ_RATIO=0.95 is 950:50), reduced (19:1) since
    # Locust repeats each task weight times; a zero weight leaves the task out.
    tasks: ClassVar[dict[Callable[..., None], int]] = {
        task: weight // math.gcd(_READS, 1000 - _READS)
        for task, weight in ((get, _READS), (put, 1000 - _READS))
        if weight > 0
    }
