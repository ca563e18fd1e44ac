"""The longest event-loop step while a big room saves to files, measured inside the process.

bench/run.py measures the stall from outside (a probe's ack latency), which on a busy
machine cannot tell 3 ms from 5. This runs one Room on FileStorage in-process, with a
Trio instrument timing every task step, and reports the longest step per save: the
longest the loop was held, whoever held it. Ours only; the Node server's figure is the
whole JSON.stringify (bench/README.md).

    .venv/bin/python bench/save_stall.py                  # 100k components, 7 saves
    .venv/bin/python bench/save_stall.py --components 20000 --saves 15
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import trio

from canvas_store_trio import FileStorage
from canvas_store_trio.rooms._room import Room


class LongestStep(trio.abc.Instrument):
    """Remembers the longest task step taken while it is installed."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._began: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._began is not None:
            self.longest = max(self.longest, time.perf_counter() - self._began)
            self._began = None


async def measure(components: int, saves: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        room = Room("big", storage=FileStorage(folder, "big"), save_throttle=1e9)
        for i in range(0, components, 4):
            room.document.apply(
                [
                    {
                        f"e{i}/{kind}": {"_exists": True, "x": i, "y": -i, "label": f"shape {i}"}
                        for kind in ("pos", "size", "style", "meta")
                    }
                ]
            )
        longest = []
        for n in range(saves + 1):
            room.document.apply([{"e0/pos": {"x": n}}])
            room._mark_unsaved()
            instrument = LongestStep()
            trio.lowlevel.add_instrument(instrument)
            try:
                await room.flush()
            finally:
                trio.lowlevel.remove_instrument(instrument)
            if n:  # the first save creates the file: not counted
                longest.append(instrument.longest * 1e3)
        return longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--components", type=int, default=100_000)
    parser.add_argument("--saves", type=int, default=7)
    args = parser.parse_args()
    longest = trio.run(measure, args.components, args.saves)
    print(
        f"{args.components} components, {args.saves} saves: longest loop step per save "
        f"median {statistics.median(longest):.1f} ms, worst {max(longest):.1f} ms "
        f"({' '.join(f'{ms:.1f}' for ms in longest)})"
    )


if __name__ == "__main__":
    main()
