"""
python -m bench.profile: where a request's time goes. It starts twistd
rendezvous, samples it with py-spy (the bench extra) while a scenario loads
it, and prints the share of samples that each function (with its callees)
and each module (its own code only) took.

    python -m bench.profile --scenario read-heavy --seconds 6 > profile.txt

The raw collapsed stacks are kept (--raw FILE) for flame graphs.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.servers import start_rendezvous


def summarize(raw: Path, top: int) -> str:
    """
    Inclusive share per function and self share per file, from py-spy's
    collapsed stacks (C{frame;frame;... count} per line).
    """
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        # "function (path/to/file.py:line)": attribute the leaf to its file.
        leaf = frames[-1]
        where = leaf[leaf.rfind("(") + 1 :].rsplit(":", 1)[0]
        own[where.split("site-packages/")[-1]] += count
    lines = [f"{total} samples", "", "inclusive share per function:"]
    for frame, count in inclusive.most_common(top):
        lines.append(f"{100 * count / total:6.1f}%  {frame}")
    lines += ["", "self share per file:"]
    for where, count in own.most_common(top):
        lines.append(f"{100 * count / total:6.1f}%  {where}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", default="read-heavy")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=60)
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    options = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = options.raw or Path(tempfile.mkdtemp()) / "stacks.txt"
    server = start_rendezvous(None).ready()
    try:
        spy = subprocess.Popen(  # noqa: S603 - our own argv
            [py_spy, "record", "--pid", str(server.proc.pid), "--format", "raw",
             "--rate", str(options.rate), "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        subprocess.run(  # noqa: S603 - our own argv
            [sys.executable, "-m", "bench", "--url", server.url, "--scenario",
             options.scenario, "--seconds", str(options.seconds),
             "--server-pid", str(server.proc.pid)],
            check=True,
            stdout=sys.stderr,
        )  # fmt: skip
        spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        spy.wait(timeout=30)
    finally:
        server.stop()
    print(summarize(raw, options.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
