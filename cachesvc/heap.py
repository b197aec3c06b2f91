"""The process's C heap (glibc's malloc): kept for reuse under load, given back when idle.

A large value (hundreds of KiB and up) is allocated and freed on every request that
carries it: the bytes of its Redis reply, its request body. By default glibc returns the
free memory at the top of its heap to the system once a little of it is free there, and
takes large blocks from mmap, so the next request's value is faulted in again page by
page. Measured on a Redis L1 hit of a 1 MB value: 174 page faults and 887 us of CPU per
hit (98 % of the faults in copying the reply's value), against about none and 616 us with
the memory kept. ``keep_for_reuse`` (at start) has blocks up to ``MMAP_THRESHOLD`` come
from the heap and keeps up to ``TRIM_THRESHOLD`` free at its top for the next ones;
``release_free_memory`` gives back everything free, when a burst is over.

Not glibc (musl, macOS): both do nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024  # blocks this large come from mmap, as before
TRIM_THRESHOLD = 64 * 1024 * 1024  # free memory the heap keeps at its top


def _glibc(name: str) -> Callable[..., int] | None:
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    return function


_MALLOPT = _glibc("mallopt")
_MALLOC_TRIM = _glibc("malloc_trim")


def keep_for_reuse() -> None:
    """Keep freed memory for the next requests: see the module's docstring."""
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``).

    A burst of write-behind writes holds many payloads of a few KiB at once (requests,
    journal batches, the overlay); once applied they are freed, but glibc keeps the pages
    of its heap that live objects are scattered over, so the process stays at its peak
    size (16 KiB bodies at 256 connections: 73 MiB before, 560 MiB after the journal
    drained, 90 MiB after a trim). Called when the flusher goes idle after flushing."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
