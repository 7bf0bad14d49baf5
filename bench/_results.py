"""Write one benchmark's table into bench/RESULTS.md without touching the others.

Each benchmark owns a section between two marker comments named after it, so several
benchmarks can be re-run independently and the file keeps every latest figure.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Each section is written by the script it names, which measures p2pcloud and its anchor\n"
    "in the same run. Absolute figures on these shared two-core machines are noisy; the\n"
    "ratios inside one section are the result.\n"
)


def machine_line() -> str:
    """One line naming the machine and interpreter the figures come from."""
    return (
        f"{time.strftime('%Y-%m-%d')}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores"
    )


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` of bench/RESULTS.md.

    Args:
        name: the benchmark's name, e.g. ``"core"``; used in the markers.
        command: the command that reproduces the figures.
        body: Markdown tables and notes.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = (
        f"{start}\n## {name}\n\nMeasured {machine_line()}. Reproduce with:\n\n"
        f"    {command}\n\n{body.rstrip()}\n{end}"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote section {name!r} of {RESULTS.name}", file=sys.stderr)
