"""ray_map on a real local Ray cluster (2 CPUs, shared by the whole module): same records as the
in-process run, each batch exactly once even when a worker dies, and clear errors."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys

import pytest

ray = pytest.importorskip("ray")

from guardprob import BackendError, InputError, ModelLoadError  # noqa: E402
from guardprob.evaluation import evaluate, score_example_batch  # noqa: E402
from guardprob.evaluation.datasets import read_dataset  # noqa: E402
from guardprob.evaluation.distributed import RayStats, check_address, ray_map  # noqa: E402
from guardprob.spec import ClassifierSpec  # noqa: E402
from helpers import LABELLED_ROWS  # noqa: E402

ROWS = LABELLED_ROWS[:8]
FAST = {"eps": 0.05}  # no node limit binds: with guesses from each worker's own history, same nodes
METHODS = ("greedy", "marginal")
SCORE = functools.partial(score_example_batch, methods=METHODS, params=FAST)


def batches_of(examples, size=2):
    return [examples[i : i + size] for i in range(0, len(examples), size)]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One Ray instance for the module: starting one costs 5-20 s."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def spec(tiny_spec):
    return tiny_spec


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def examples(data):
    return read_dataset(data, taxonomy="llama-guard-3").examples


@pytest.fixture(scope="module")
def expected(spec, examples):
    """Records of the in-process run over the same batches, by index, without the timing."""
    from guardprob.classifier import Classifier

    classifier = Classifier.from_spec(spec)
    return {r["index"]: untimed(r) for batch in batches_of(examples) for r in SCORE(classifier, batch)}


def untimed(record):
    return {k: v for k, v in record.items() if k != "seconds"}




class DieOnce:
    """Scores like fn, but the worker process exits the first time it gets example ``index``
    (a file marks that it happened, so the retry on another worker goes through); with
    ``always`` it exits every time."""

    def __init__(self, marker, index, always=False):
        self.marker, self.index, self.always = str(marker), index, always

    def __call__(self, classifier, batch):
        if any(e.index == self.index for e in batch) and (self.always or not os.path.exists(self.marker)):
            with open(self.marker, "a") as f:
                f.write("died\n")
            os._exit(1)
        return SCORE(classifier, batch)


def collect(spec, batches, fn, **kw):
    stats = []
    out = list(ray_map(spec, batches, fn, address="auto", on_stats=stats.append, **kw))
    return out, stats[0] if stats else None


def test_ray_map_matches_in_process(spec, examples, expected):
    out, stats = collect(spec, batches_of(examples), SCORE, workers=2)
    records = [r for batch in out for r in batch]
    assert sorted(r["index"] for r in records) == sorted(expected)  # every example exactly once
    assert_close({r["index"]: untimed(r) for r in records}, expected)  # float32 sums may differ in threads
    assert isinstance(stats, RayStats) and len(stats.workers) == 2
    assert stats.examples == len(examples) and stats.batches == 4 and stats.retries == stats.restarts == 0
    assert all(w.pid and w.batches and w.rate > 0 for w in stats.workers)
    assert "ex/s" in stats.summary()


def test_lost_worker_batch_is_retried_once(tmp_path, spec, examples, expected):
    marker = tmp_path / "died"
    out, stats = collect(spec, batches_of(examples), DieOnce(marker, index=2), workers=2)
    assert marker.read_text() == "died\n"
    records = [r for batch in out for r in batch]
    assert sorted(r["index"] for r in records) == sorted(expected)
    assert_close({r["index"]: untimed(r) for r in records}, expected)
    assert stats.retries == 1 and stats.restarts == 1 and len(stats.workers) == 3
    assert sum(w.failures for w in stats.workers) == 1 and stats.examples == len(examples)


class HangOnce:
    """Scores like fn, but the first time it gets example ``index`` the worker hangs (alive,
    silent) instead of answering; a file marks that it happened."""

    def __init__(self, marker, index):
        self.marker, self.index = str(marker), index

    def __call__(self, classifier, batch):
        if any(e.index == self.index for e in batch) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            import time

            time.sleep(3600)
        return SCORE(classifier, batch)


def test_hung_worker_is_killed_and_its_batch_retried(tmp_path, spec, examples, expected):
    # timed on the worker from the start of the batch: the tiny model scores one in well under a second
    out, stats = collect(spec, batches_of(examples), HangOnce(tmp_path / "hung", index=4), workers=2, batch_timeout=10)
    assert (tmp_path / "hung").exists()
    records = [r for batch in out for r in batch]
    assert sorted(r["index"] for r in records) == sorted(expected)  # nothing lost, nothing twice
    assert_close({r["index"]: untimed(r) for r in records}, expected)
    assert stats.retries == 1 and stats.restarts == 1 and sum(w.failures for w in stats.workers) == 1
    with pytest.raises(InputError, match="batch_timeout"):
        collect(spec, batches_of(examples), SCORE, batch_timeout=0)


def test_batch_that_keeps_killing_workers_fails_by_name(tmp_path, spec, examples):
    with pytest.raises(BackendError, match=r"batch 0 \(examples 0, 1\) lost its Ray worker 2 times"):
        collect(spec, batches_of(examples), DieOnce(tmp_path / "died", index=0, always=True), workers=1, max_retries=1)
    assert (tmp_path / "died").read_text().count("died") == 2


def test_evaluate_with_ray_writes_the_same_results(tmp_path, data, spec):
    common = dict(spec=spec, methods=list(METHODS), batch_size=3, params=FAST, progress=False, show=False)
    evaluate(data, out=tmp_path / "plain", **common)
    evaluate(data, out=tmp_path / "ray", ray="local", ray_workers=2, **common)
    plain, distributed = (read_lines(tmp_path / d / "results.jsonl") for d in ("plain", "ray"))
    assert distributed[0] == plain[0]  # the same header: a Ray run can resume a plain one and back
    assert sorted(r["index"] for r in distributed[1:]) == list(range(len(ROWS)))
    assert_close(sorted(distributed[1:], key=lambda r: r["index"]), sorted(plain[1:], key=lambda r: r["index"]))


def test_worker_errors_arrive_as_themselves(tmp_path, spec, examples):
    bad = ClassifierSpec(model=str(tmp_path / "missing"), format="llama-guard-3")
    with pytest.raises(ModelLoadError, match="could not load model"):  # raised in every worker's __init__
        list(ray_map(bad, batches_of(examples), SCORE, address="auto", workers=1))
    bad_params = functools.partial(score_example_batch, methods=METHODS, params={"eps": -1.0})
    with pytest.raises(InputError, match="eps"):
        list(ray_map(spec, batches_of(examples), bad_params, address="auto", workers=1))


def test_bad_addresses():
    with pytest.raises(InputError, match="use auto, local, HOST:PORT"):
        list(ray_map(ClassifierSpec(), [[1]], SCORE, address="nowhere"))
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(BackendError, match=f"cannot reach the Ray cluster at {address}"):
            check_address(address)
    with pytest.raises(InputError, match="positive number of Ray workers"):
        list(ray_map(ClassifierSpec(), [[1]], SCORE, address="auto", workers=0))


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_close(a, b, tol=1e-6):
    """Equal JSON trees, numbers within tol, ignoring the per-example timing."""
    if isinstance(a, dict):
        assert set(a) - {"seconds"} == set(b) - {"seconds"}
        for k in set(a) - {"seconds"}:
            assert_close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_close(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= tol
    else:
        assert a == b
