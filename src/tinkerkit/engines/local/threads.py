"""How many CPU threads the local engine's PyTorch work uses: all cores on an idle machine, fewer
when other programs keep cores busy.

A training step on the CPU is thousands of short parallel regions (one per matrix product or
elementwise pass), and PyTorch's OpenMP threads wait for each other at the end of every one of
them. When another program keeps a core busy, the thread on that core runs only in the time
slices the kernel gives it, and every region waits for it: on 2 cores with one other busy process,
SmolLM2-135M training fell from 337 to 50 tokens/s with 2 threads, and ran 191 tokens/s with one
(docs/PERFORMANCE.md, "A fair share of a busy machine"). Making the threads sleep instead of spin
while they wait (``OMP_WAIT_POLICY=PASSIVE``) helps less (174) and costs the idle machine 16%.

:class:`CpuShare` therefore measures how many cores the rest of the machine used while the engine
worked (``/proc/stat`` minus this process's own CPU time) and sets ``torch.set_num_threads`` to
the cores left, between 1 and the thread count the engine started with. A user's own choice wins: it
does nothing when ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` is set, when ``torch.set_num_threads`` was called after
tinkerkit's engine was imported (a call before the import looks like torch's own default and
is adapted from), when the ``CPU_THREADS`` setting is a number (then that many
threads), on a GPU, and where ``/proc/stat`` does not exist (not Linux).

Floating-point sums (matrix products, reductions) are split by thread, so their rounding depends
on the count: a run is bitwise repeatable on the CPU only at a fixed count, which a user who
needs that (exact resume) sets as above.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tinkerkit.errors import EngineError

USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                         "KMP_BLOCKTIME")
"""Environment variables by which a user chooses threads or their waiting; any of them set turns
the adaptation off."""
MIN_INTERVAL_SECONDS = 0.2
"""Measured work the thread count is decided on: spans of work are added up to this many
seconds (``/proc/stat`` counts in clock ticks of 10 ms: 0.2 s on 2 CPUs is 40 ticks, enough to tell a busy core)."""
PROC_STAT = Path("/proc/stat")

_IMPORT_THREADS = torch.get_num_threads()  # torch's count before any tinkerkit client ran
_COUNTS_SET: set[int] = set()  # counts CpuShare itself set (a thread it adjusted is not a choice)


def machine_cpu_seconds(stat: Path = PROC_STAT) -> tuple[float, float, int] | None:
    """Busy and total CPU seconds of the whole machine since boot, and its number of CPUs.

    From the aggregate ``cpu`` line of ``/proc/stat`` (``man 5 proc``: user, nice, system, idle,
    iowait, irq, softirq, steal, in clock ticks; guest time is already counted in user). Busy is
    everything but idle and iowait. Returns None where the file is missing or unreadable.
    """
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("cpu "):
        return None
    ticks = [int(v) for v in lines[0].split()[1:9]]
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    hertz = os.sysconf("SC_CLK_TCK")
    total = sum(ticks) / hertz
    return total - (ticks[3] + ticks[4]) / hertz, total, max(cpus, 1)


def threads_for_share(others: float, cpus: int, most: int) -> int:
    """Threads for this process when the rest of the machine keeps ``others`` cores busy.

    ``round(cpus - others)``, between 1 and ``most``: a core counts as taken when another
    program used more than half of it.
    """
    return max(1, min(most, int(cpus - others + 0.5)))


def cpu_threads_setting(value: int | str) -> int | None:
    """The ``CPU_THREADS`` setting as a fixed thread count, or None for ``"auto"``.

    Raises:
        EngineError: Neither ``"auto"`` nor a positive integer.
    """
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EngineError(f"cpu_threads={value!r}: use 'auto' or a positive number of threads")
    return value


class CpuShare:
    """Sets the calling thread's PyTorch thread count from the machine's load during its work.

    Wrap each piece of CPU work in :meth:`measure`, in the thread that runs it (a training
    client's worker, a sampler's thread). The spans are added up; once they cover
    :data:`MIN_INTERVAL_SECONDS`, the machine's busy CPU time in them minus this process's own
    (``time.process_time``, all its threads) gives the cores other programs used while this work
    ran, and ``torch.set_num_threads`` is set to :func:`threads_for_share` for the work that
    follows. Time between spans (this process idle, waiting for its caller) is not counted: what
    other programs did then says nothing about the cores this work will get.

    Args:
        device: The engine's device; only ``cpu`` adapts.
        cpu_threads: ``"auto"`` (adapt, unless the user chose threads: see the module docstring)
            or a number of threads to use always.

    Attributes:
        adaptive: Whether :meth:`measure` changes the thread count.
        threads: The thread count chosen last (the starting count before).

    Raises:
        EngineError: A bad ``cpu_threads``.
    """

    def __init__(self, device: torch.device, cpu_threads: int | str = "auto") -> None:
        fixed = cpu_threads_setting(cpu_threads)
        self.fixed = fixed if device.type == "cpu" else None
        current = torch.get_num_threads()
        chosen = (any(os.environ.get(name) for name in USER_THREAD_VARIABLES)
                  or current not in {_IMPORT_THREADS, *_COUNTS_SET})
        # A thread another share turned down (a sampler made in a training worker) still starts
        # from the engine's own count.
        self.most = current if chosen else _IMPORT_THREADS
        self.threads = self.fixed or self.most
        self.adaptive = (device.type == "cpu" and self.fixed is None and not chosen
                         and machine_cpu_seconds() is not None)
        self._spans = [0.0, 0.0, 0.0, 0.0]  # wall, machine busy, machine total, own CPU seconds

    def _sample(self) -> tuple[float, float, float, float] | None:
        machine = machine_cpu_seconds()
        if machine is None:
            return None
        busy, total, self._cpus = machine
        return time.perf_counter(), busy, total, time.process_time()

    @contextmanager
    def measure(self) -> Iterator[int]:
        """Run the ``with`` body with this share's thread count and measure the machine meanwhile.

        Yields:
            The thread count the body runs with.
        """
        if self.fixed is not None and torch.get_num_threads() != self.fixed:
            torch.set_num_threads(self.fixed)
        if self.adaptive and torch.get_num_threads() != self.threads:
            _COUNTS_SET.add(self.threads)
            torch.set_num_threads(self.threads)  # this thread may not have run with it yet
        start = self._sample() if self.adaptive else None
        try:
            yield self.threads
        finally:
            end = self._sample() if start is not None else None
            if end is not None:
                self._add(start, end)

    def _add(self, start: tuple[float, ...], end: tuple[float, ...]) -> None:
        for i, (a, b) in enumerate(zip(start, end)):
            self._spans[i] += b - a
        wall, busy, total, own = self._spans
        if wall < MIN_INTERVAL_SECONDS:
            return
        self._spans = [0.0, 0.0, 0.0, 0.0]
        # Cores the machine used, from the share of busy time in all CPUs' time.
        machine_cores = busy / total * self._cpus if total > 0 else 0.0
        threads = threads_for_share(max(0.0, machine_cores - own / wall), self._cpus, self.most)
        if threads != self.threads:
            _COUNTS_SET.add(threads)
            torch.set_num_threads(threads)
            self.threads = threads
