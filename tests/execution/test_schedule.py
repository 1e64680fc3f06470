"""run_jobs: dependencies respected, critical path first, and on two workers a shorter makespan than
submitting everything at once (Ray's first-ready-first-run order), shown on a simulated clock."""

import pytest

from compressor.execution.base import Executor, InProcessExecutor
from compressor.execution.schedule import After, Job, critical_path, run_jobs


def _job(key, cost, *deps):
    return Job(key, lambda *a: key, tuple(After(d) for d in deps), cost)


# One SmolLM2 block as measured on one worker (ms): the factor F of down_proj's 1536-wide input, which
# down_proj's two row halves D1, D2 wait for, and the 576-wide factors fa (q, k, v), fm (gate, up), fo (o).
BLOCK = [_job("F", 204), _job("fa", 13), _job("fm", 13), _job("fo", 14),
         _job("D1", 115, "F"), _job("D2", 115, "F"), _job("gate", 110, "fm"), _job("up", 110, "fm"),
         _job("q", 45, "fa"), _job("o", 45, "fo"), _job("k", 15, "fa"), _job("v", 15, "fa")]


def test_rank_is_cost_plus_the_longest_chain_after_it():
    rank = critical_path(BLOCK)
    assert rank["F"] == 319 and rank["fm"] == 123 and rank["fa"] == 58 and rank["D1"] == 115 and rank["v"] == 15


def test_jobs_start_after_their_dependencies_in_rank_order():
    order = []
    jobs = [Job(j.key, (lambda k: lambda *a: order.append((k, a)) or k)(j.key), j.args, j.cost) for j in BLOCK]
    handles = run_jobs(InProcessExecutor(), jobs)
    assert [k for k, _ in order] == ["F", "fm", "D1", "D2", "gate", "up", "fo", "fa", "q", "o", "k", "v"]
    assert dict(order)["D1"] == ("F",)  # the dependency's result, not its placeholder
    assert InProcessExecutor().gather([handles["v"]]) == ["v"]


def test_cycles_and_unknown_dependencies_are_named():
    with pytest.raises(ValueError, match="cycle"):
        critical_path([_job("x", 1, "y"), _job("y", 1, "x")])
    with pytest.raises(ValueError, match="'x' depends on 'nope'"):
        run_jobs(InProcessExecutor(), [_job("x", 1, "nope")])


class _SimulatedCluster(Executor):
    """Two workers on a virtual clock; queued jobs start in the order they became ready, like Ray."""

    def __init__(self, durations: dict, workers: int = 2) -> None:
        self.durations, self.workers, self.now = durations, workers, 0.0
        self.queue: list = []  # (handle) ready, in readiness order
        self.blocked: list = []  # submitted with unfinished dependencies
        self.running: dict = {}  # handle -> end time
        self.finished: set = set()

    @property
    def parallelism(self) -> int:
        return self.workers

    def put(self, value):
        return value

    def submit(self, fn, *args):
        handle = (fn(*args), tuple(a for a in args if isinstance(a, tuple)))  # (key, dependency handles)
        self.blocked.append(handle)
        self._dispatch()
        return handle

    def _dispatch(self):
        for h in [h for h in self.blocked if all(d in self.finished for d in h[1])]:
            self.blocked.remove(h)
            self.queue.append(h)
        while self.queue and len(self.running) < self.workers:
            h = self.queue.pop(0)
            self.running[h] = self.now + self.durations[h[0]]

    def wait(self, handles):
        if not any(h in self.finished for h in handles):
            h, end = min(self.running.items(), key=lambda kv: kv[1])
            self.now = end
            del self.running[h]
            self.finished.add(h)
            self._dispatch()
        return [h for h in handles if h in self.finished], [h for h in handles if h not in self.finished]

    def gather(self, handles, desc=None):
        while any(h not in self.finished for h in handles):
            self.wait([h for h in handles if h not in self.finished])
        return [h[0] for h in handles]


def test_critical_path_first_beats_submitting_everything_on_two_workers():
    durations = {j.key: j.cost for j in BLOCK}
    keys = [j.key for j in BLOCK]
    ours = _SimulatedCluster(durations)
    handles = run_jobs(ours, [Job(j.key, (lambda k: lambda *a: k)(j.key), j.args, j.cost) for j in BLOCK])
    ours.gather(list(handles.values()))

    naive = _SimulatedCluster(durations)  # every job submitted at once, factors first, longest first
    submitted = {}
    for j in sorted(BLOCK, key=lambda j: (bool(j.deps), -j.cost)):
        args = tuple(submitted[a.key] for a in j.args)
        submitted[j.key] = naive.submit((lambda k: lambda *a: k)(j.key), *args)
    naive.gather([submitted[k] for k in keys])

    total = sum(durations.values())  # 814: 407 per worker at best
    assert ours.now <= total / 2 + 5  # both workers busy to the end
    assert naive.now >= ours.now + 20  # D1 and D2 queue behind the short layers and run last
