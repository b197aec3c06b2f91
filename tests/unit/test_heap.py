"""cachesvc/heap.py: with the heap kept for reuse, large values allocated and freed over
and over are not faulted in again each time. Each case in a process of its own (mallopt
holds for the whole process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Ten 1 MB values made and dropped, as a batch of large Redis replies is, twenty times
# over: the page faults (fresh memory touched) of those twenty rounds.
PROBE = """
import resource, sys
from cachesvc import heap
if sys.argv[1] == "keep":
    heap.keep_for_reuse()
def batch():
    values = [b"v" * 1_000_000 for _ in range(10)]
    del values
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(probe.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_values_reuse_the_heap_instead_of_faulting_it_in_again() -> None:
    fresh = faults("default")
    assert fresh > 20 * 10 * 100  # ~256 pages a value, every round
    assert faults("keep") < fresh / 20
