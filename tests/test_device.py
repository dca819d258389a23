"""device: the CPU's layer workers (`layer_workers`, `map_layers`)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from sparselm import device
from sparselm.capture import LinearStats
from sparselm.methods import whiten

CPU = torch.device("cpu")


def test_layer_workers_take_the_threads_the_tasks_and_the_memory_into_account(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(device, "available_memory", lambda: 10_000)
    assert device.layer_workers(CPU, 7, 1000) == 4  # one per thread
    assert device.layer_workers(CPU, 3, 1000) == 3  # no more than the tasks
    assert device.layer_workers(CPU, 7, 2000) == 2  # half of the memory holds two
    assert device.layer_workers(CPU, 7, 6000) == 1
    assert device.layer_workers(CPU, 1, 10) == 1
    assert device.layer_workers(torch.device("cuda"), 7, 10) == 1  # one layer at a time on an accelerator
    monkeypatch.setattr(device, "available_memory", lambda: None)
    assert device.layer_workers(CPU, 7, 10) == 1  # memory unknown: one


def test_available_memory_reads_the_kernel_or_says_none():
    free = device.available_memory()
    assert free is None or free > 0


def test_map_layers_runs_the_costliest_first_on_one_thread_each_and_keeps_the_order():
    started, threads = [], set()

    def fn(x):
        started.append(x)
        threads.add((threading.get_ident(), torch.get_num_threads()))
        time.sleep(0.01)
        return x * x

    before = torch.get_num_threads()
    assert device.map_layers(fn, [1, 5, 3, 4], 2, cost=lambda x: x) == [1, 25, 9, 16]
    assert started[:2] in ([5, 4], [4, 5]) and started[2:] in ([3, 1], [1, 3])
    assert {n for _, n in threads} == {1} and threading.get_ident() not in {t for t, _ in threads}
    assert torch.get_num_threads() == before
    started.clear()
    assert device.map_layers(fn, [2, 3], 1) == [4, 9] and started == [2, 3]  # one worker: in the caller


def test_map_layers_raises_the_first_error_and_starts_nothing_more():
    ran = []

    def fn(x):
        ran.append(x)
        if x == 0:
            raise ValueError("layer 0")
        time.sleep(0.05)
        return x

    with pytest.raises(ValueError, match="layer 0"):
        device.map_layers(fn, list(range(12)), 2)
    assert len(ran) < 12


def test_each_thread_keeps_its_own_last_whitening():
    """The shared-Gram cache of `whiten.whiten` is per thread: layers whitened side by side never read another
    thread's entry, and each thread still computes a Gram it keeps once."""
    x = torch.randn(40, 6, dtype=torch.float64)
    stats = LinearStats(gram=x.T @ x, count=40)
    mine = whiten.whiten(stats)
    assert whiten.whiten(stats) is mine
    theirs = []
    t = threading.Thread(target=lambda: theirs.extend([whiten.whiten(stats), whiten.whiten(stats)]))
    t.start()
    t.join()
    assert theirs[0] is theirs[1] and theirs[0] is not mine
    torch.testing.assert_close(theirs[0].L, mine.L)
    assert whiten.whiten(stats) is mine


def test_layers_side_by_side_leave_the_process_thread_count_as_it_was():
    """torch keeps the last thread count set in any thread as the process's, and each thread's first parallel
    region in a library (the C++ extension has its own) takes it: after `map_layers` a fresh thread still gets the
    caller's count, not the workers' one (a compressed model's first forward had dropped the caller to 1)."""
    from sparselm.modules import SparseLinear
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        device.map_layers(lambda x: torch.mm(torch.randn(64, 64), torch.randn(64, 64)), [1, 2, 3], 2)
        m = SparseLinear(torch.randn(64, 128), torch.rand(64, 128) < 0.5, None, None, torch.float32)
        seen = []

        def fresh():
            m(torch.randn(100, 128))  # the panel product: a parallel region in the extension (or torch's own)
            seen.append(torch.get_num_threads())

        t = threading.Thread(target=fresh)
        t.start()
        t.join()
        assert seen == [3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
