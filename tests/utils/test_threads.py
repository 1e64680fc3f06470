"""thread_map: per-layer jobs on threads, results in input order, torch's thread count restored."""

import threading

import pytest
import torch

from compressor.utils.threads import thread_map


def test_results_come_back_in_input_order_and_largest_jobs_start_first():
    started: list[int] = []
    lock = threading.Lock()

    def job(x: int) -> int:
        with lock:
            started.append(x)
        return x * x

    items = [3, 9, 1, 7, 5]
    assert thread_map(job, items, cost=float, workers=2) == [9, 81, 1, 49, 25]
    assert sorted(started[:2]) == [7, 9]  # the two largest go first


def test_workers_run_single_threaded_and_the_callers_thread_count_is_restored():
    before = torch.get_num_threads()
    seen = thread_map(lambda _: torch.get_num_threads(), range(4), workers=2)
    assert seen == [1, 1, 1, 1]
    assert torch.get_num_threads() == before
    # a thread started afterwards gets the caller's setting again, not the workers'
    after: list[int] = []
    t = threading.Thread(target=lambda: after.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert after == [before]


def test_errors_propagate_and_one_worker_runs_inline():
    with pytest.raises(ValueError, match="bad item 2"):
        thread_map(lambda x: (_ for _ in ()).throw(ValueError(f"bad item {x}")) if x == 2 else x, [1, 2, 3], workers=2)
    main = threading.get_ident()
    assert thread_map(lambda _: threading.get_ident(), [1, 2], workers=1) == [main, main]
