"""Where a sampled process spends its time: ``python -m bench.profile FILE [--top N]``.

FILE is py-spy's ``--format raw`` output (collapsed stacks, one ``frame;frame;... count``
line per distinct stack), as ``python -m bench.run --profile`` writes it. Prints the
functions with the most samples on top of the stack (self) and anywhere in it
(inclusive), as shares of all samples, and the self time by file and by package, so
that the cost of aiohttp, redis-py, prometheus_client and cachesvc itself can be told
apart. Time in C (uvloop, the HTTP parser, hiredis, msgpack, syscalls) counts for the
Python frame that called it: ``run_app`` is the event loop itself.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# py-spy frames look like "function (path/to/file.py:123)"; idle frames have no file.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    return f"{match['function']} ({_short(match['file'])})"


def _file(frame: str) -> str:
    match = _FRAME.match(frame)
    return _short(match["file"]) if match else frame


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return path


def _package(frame: str) -> str:
    """aiohttp, redis, cachesvc, asyncio...: the first part of the frame's file."""
    path = _file(frame)
    if not path or path.startswith("<"):
        return path or "(native)"
    head = path.split("/", 1)[0]
    return head.removesuffix(".py")


def parse(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    stacks = []
    pending = ""  # a frame name py-spy printed with a newline in it continues a line
    for line in lines:
        line = pending + line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            pending = line
            continue
        pending = ""
        stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(
    stacks: Sequence[tuple[list[str], int]], top: int = 25
) -> dict[str, list[tuple[str, float]]]:
    total = sum(count for _, count in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        own[_function(frames[-1])] += count
        by_file[_file(frames[-1])] += count
        by_package[_package(frames[-1])] += count
        for name in {_function(frame) for frame in frames}:
            inclusive[name] += count
    return {
        "self": [(name, n / total) for name, n in own.most_common(top)],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top)],
        "self by file": [(name, n / total) for name, n in by_file.most_common(top)],
        "self by package": [(name, n / total) for name, n in by_package.most_common(top)],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with args.file.open() as lines:
        stacks = parse(lines)
    print(f"{sum(c for _, c in stacks)} samples in {args.file}")
    for title, entries in summarize(stacks, args.top).items():
        print(f"\n{title}:")
        for name, share in entries:
            print(f"  {share:6.1%}  {name}")


if __name__ == "__main__":
    main()
