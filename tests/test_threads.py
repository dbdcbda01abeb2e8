"""The local engine's CPU thread count: all cores on an idle machine, the cores left on a busy one."""

from __future__ import annotations

import pytest
import torch

from tinkerkit.engines.local import threads
from tinkerkit.engines.local.threads import (
    CpuShare,
    machine_cpu_seconds,
    threads_for_share,
)
from tinkerkit.errors import EngineError


@pytest.fixture(autouse=True)
def _keep_torch_threads(monkeypatch):
    before = torch.get_num_threads()
    for name in threads.USER_THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_COUNTS_SET", set())  # counts other tests' shares set
    yield
    torch.set_num_threads(before)


def test_machine_cpu_seconds_reads_the_aggregate_line(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    stat.write_text("cpu  300 0 100 500 100 0 0 0 0 0\ncpu0 150 0 50 250 50 0 0 0 0 0\n"
                    "cpu1 150 0 50 250 50 0 0 0 0 0\nintr 1\n")
    hertz = threads.os.sysconf("SC_CLK_TCK")
    assert machine_cpu_seconds(stat) == (400 / hertz, 1000 / hertz, 2)  # busy, total, CPUs
    assert machine_cpu_seconds(tmp_path / "missing") is None
    (tmp_path / "odd").write_text("intr 1\n")
    assert machine_cpu_seconds(tmp_path / "odd") is None


@pytest.mark.parametrize(("others", "cpus", "most", "expected"), [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (3.0, 2, 2, 1),
    (0.0, 16, 8, 8), (10.2, 16, 8, 6), (0.0, 2, 1, 1)])
def test_threads_for_share_leaves_the_cores_others_use(others, cpus, most, expected):
    assert threads_for_share(others, cpus, most) == expected


def fake_machine(monkeypatch, samples):
    """CpuShare reads (wall, own CPU, machine busy, machine total) from ``samples`` in turn."""
    it = iter(samples)
    current = {}

    def read():
        current.update(zip(("wall", "own", "busy", "total"), next(it)))
        return current["busy"], current["total"], 2

    monkeypatch.setattr(threads, "machine_cpu_seconds", read)
    monkeypatch.setattr(threads.time, "perf_counter", lambda: current["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: current["own"])


def test_adapts_to_a_busy_core_and_back(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_IMPORT_THREADS", 2)
    share = CpuShare(torch.device("cpu"))
    assert share.adaptive and share.most == 2
    fake_machine(monkeypatch, [
        (0.0, 0.0, 0.0, 0.0), (2.0, 4.0, 4.0, 4.0),  # idle machine: we used both cores for 2 s
        # 10 s later (we were idle; others may have been busy: not counted) another program
        # takes a core while we work: we got 1.05 cores, the machine used 2
        (12.0, 5.0, 24.0, 24.0), (14.0, 7.1, 28.0, 28.0),
        (14.0, 7.1, 28.0, 28.0), (16.0, 9.1, 32.0, 32.0),  # still busy: one thread
        # two short spans of 0.15 s: too short alone, decided on together (the machine used
        # only our core: back to two threads)
        (16.0, 9.1, 32.0, 32.0), (16.15, 9.25, 32.15, 32.3),
        (16.15, 9.25, 32.15, 32.3), (16.3, 9.4, 32.3, 32.6),
    ])
    seen = []
    for _ in range(5):
        with share.measure() as count:
            seen.append((count, torch.get_num_threads()))
    assert seen == [(2, 2), (2, 2), (1, 1), (1, 1), (1, 1)]
    assert share.threads == torch.get_num_threads() == 2


def test_a_users_choice_wins(monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_IMPORT_THREADS", 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not CpuShare(torch.device("cpu")).adaptive
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert not CpuShare(torch.device("cpu")).adaptive
    monkeypatch.delenv("OMP_WAIT_POLICY")
    torch.set_num_threads(1)  # torch.set_num_threads after tinkerkit was imported
    share = CpuShare(torch.device("cpu"))
    with share.measure() as count:
        assert not share.adaptive and count == torch.get_num_threads() == 1
    torch.set_num_threads(2)
    fixed = CpuShare(torch.device("cpu"), cpu_threads=1)  # CPU_THREADS = 1
    with fixed.measure() as count:
        assert not fixed.adaptive and count == torch.get_num_threads() == 1
    assert not CpuShare(torch.device("meta")).adaptive  # not a CPU: nothing to share
    with pytest.raises(EngineError, match="cpu_threads=0"):
        CpuShare(torch.device("cpu"), cpu_threads=0)


def test_a_thread_another_share_turned_down_still_adapts(monkeypatch):
    # A sampler made in a training worker whose share chose one thread on a busy machine: that
    # count is not the user's choice; the sampler adapts and may go back to the engine's count.
    monkeypatch.setattr(threads, "_IMPORT_THREADS", 2)
    monkeypatch.setattr(threads, "_COUNTS_SET", {1})
    torch.set_num_threads(1)
    share = CpuShare(torch.device("cpu"))
    assert share.adaptive and share.most == 2
    monkeypatch.setattr(threads, "_COUNTS_SET", set())
    assert not CpuShare(torch.device("cpu")).adaptive  # 1 set by someone else: a choice
