"""Scoring batches on a Ray cluster: ``ray_map`` hands batches to a pool of Ray actors, each
holding one classifier built once from a picklable ``ClassifierSpec``, and yields each batch's
result as soon as it is done, so the runner can append it to its resumable results file.

Work is pulled, not pre-assigned: an actor gets its next batch when it hands back the last one,
so a slow worker never holds the rest back. A worker that dies (process killed, node lost) costs
only its in-flight batch, which goes to another worker; a replacement worker is started, up to a
bound. With ``batch_timeout``, a worker whose batch runs longer than that (hung, not dead) ends
its own process, and the batch goes the same way. Every batch is yielded exactly once, in
the order the batches finish.

This is the only module that imports ray (``pip install guardprob[ray]``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from guardprob.errors import BackendError, GuardprobError, InputError

MAX_RETRIES = 2  # further attempts per batch after a worker died under it
PROBE_SECONDS = 5.0  # ray.init retries an unreachable address for minutes; fail fast instead
HUNG_EXIT_CODE = 75  # a worker ends itself with it when a batch runs past batch_timeout


@dataclass(frozen=True)
class WorkerStats:
    """One worker's share: busy is the time spent in ``fn``, measured inside the worker."""

    name: str
    node: str
    pid: int | None
    batches: int
    examples: int
    busy: float
    failures: int  # batches lost because this worker died under them

    @property
    def rate(self) -> float:
        """Examples per busy second."""
        return self.examples / self.busy if self.busy > 0 else 0.0


@dataclass(frozen=True)
class RayStats:
    """What a ``ray_map`` run did, per worker (replacements are listed as workers of their own)."""

    address: str
    seconds: float  # wall time, from connecting to the last batch
    workers: tuple[WorkerStats, ...]
    retries: int
    restarts: int

    @property
    def examples(self) -> int:
        return sum(w.examples for w in self.workers)

    @property
    def batches(self) -> int:
        return sum(w.batches for w in self.workers)

    def summary(self) -> str:
        rate = self.examples / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"ray ({self.address}): {self.examples} examples in {self.batches} batches on {len(self.workers)} "
            f"worker(s), {self.seconds:.1f} s wall, {rate:.2f} ex/s overall; "
            f"{self.retries} batch retry(ies), {self.restarts} worker restart(s)"
        ]
        for w in self.workers:
            lines.append(
                f"  {w.name} ({w.node}, pid {w.pid}): {w.batches} batches, {w.examples} examples, "
                f"{w.busy:.1f} s busy, {w.rate:.2f} ex/s, {w.failures} failure(s)"
            )
        return "\n".join(lines)


def check_address(address: str, probe: bool = True) -> str:
    """Refuse a malformed (InputError) or unreachable (BackendError) address quickly; return its
    kind: local, auto, client (ray://) or cluster (HOST:PORT of a cluster's GCS).

    The runner can call this before it writes anything, so a typo leaves no results file behind.
    """
    if not isinstance(address, str):
        raise InputError(f"ray address {address!r}: use auto, local, HOST:PORT or ray://HOST:PORT")
    if address in ("local", "auto"):
        return address
    client = address.startswith("ray://")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        raise InputError(f"--ray {address!r}: use auto, local, HOST:PORT (a cluster's GCS) or ray://HOST:PORT (Ray Client)")
    if probe:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
        except OSError as exc:
            raise BackendError(f"cannot reach the Ray cluster at {address} ({exc}); is `ray start --head` running there?") from None
    return "client" if client else "cluster"


class _Worker:
    """One classifier, built once when the actor starts, scoring whatever batch it is handed."""

    def __init__(self, spec: Any, threads: int | None) -> None:
        if threads:  # torch would otherwise use every core of the node, fighting the other workers
            import torch

            torch.set_num_threads(threads)
        if spec.device.startswith("cuda"):  # Ray sets CUDA_VISIBLE_DEVICES to this actor's one GPU
            spec = replace(spec, device="cuda")
        self.where = (ray.util.get_node_ip_address(), os.getpid())
        self.error: Exception | None = None
        try:
            from guardprob.classifier import Classifier

            self.classifier = Classifier.from_spec(spec)
        except Exception as exc:  # kept for run(): it then reaches the driver as itself, not as a dead actor
            self.error = exc

    def run(self, fn: Callable[[Any, Any], list], batch: Any, timeout: float | None = None) -> tuple[list, float, tuple[str, int]]:
        if self.error is not None:
            raise self.error
        # A hung batch (a stuck engine or server) would hold this worker forever: past the
        # timeout the process exits, which the driver handles like any lost worker.
        watchdog = threading.Timer(timeout, os._exit, args=(HUNG_EXIT_CODE,)) if timeout else None
        if watchdog is not None:
            watchdog.daemon = True
            watchdog.start()
        started = time.perf_counter()
        try:
            records = fn(self.classifier, batch)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        return records, time.perf_counter() - started, self.where


_RemoteWorker = ray.remote(max_restarts=0, max_task_retries=0)(_Worker)  # ray_map does the retrying


class _Slot:
    """A worker's mutable tally while the map runs (frozen into WorkerStats at the end)."""

    def __init__(self, name: str, actor: Any) -> None:
        self.name, self.actor = name, actor
        self.node, self.pid = "?", None
        self.batches = self.examples = self.failures = 0
        self.busy = 0.0

    def stats(self) -> WorkerStats:
        return WorkerStats(self.name, self.node, self.pid, self.batches, self.examples, self.busy, self.failures)


def ray_map(
    spec: Any,
    batches: Sequence[Sequence[Any]],
    fn: Callable[[Any, Any], list],
    *,
    address: str,
    workers: int = 1,
    num_cpus: int = 1,
    max_retries: int = MAX_RETRIES,
    max_restarts: int | None = None,
    batch_timeout: float | None = None,
    on_stats: Callable[[RayStats], None] | None = None,
) -> Iterator[list]:
    """Yield ``fn(classifier, batch)`` for every batch, in the order they finish, each exactly once.

    address: "local" starts a Ray instance in this process; "auto" joins the cluster named by
    RAY_ADDRESS or started on this machine (``ray start``), else starts one; HOST:PORT or
    ray://HOST:PORT joins that cluster, whose nodes need guardprob installed. A process that has
    already called ``ray.init`` keeps its connection, whatever the address.
    workers: actors, each with its own classifier: one GPU each where the cluster has GPUs and
    spec.device is cuda, else ``num_cpus`` CPUs each (and as many torch threads).
    max_retries: attempts a batch gets after a worker died under it, before BackendError.
    max_restarts: replacement workers in all (default: ``workers + max_retries``).
    batch_timeout: seconds one batch may run on a worker (timed there, from the start of
    ``fn``); past it the worker process exits and the batch is retried as if it had died.
    on_stats: called with the run's RayStats once every batch is done.
    """
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r}: use a positive number of Ray workers")
    if not isinstance(num_cpus, int) or num_cpus < 1:
        raise InputError(f"num_cpus={num_cpus!r}: use a positive number of CPUs per worker")
    if batch_timeout is not None and not (isinstance(batch_timeout, (int, float)) and batch_timeout > 0):
        raise InputError(f"batch_timeout={batch_timeout!r}: use a positive number of seconds, or None for no limit")
    if not batches:
        return
    started = time.perf_counter()
    owned = connect_ray(address, workers * num_cpus)
    slots: list[_Slot] = []
    try:
        options, capacity = _actor_options(spec, num_cpus)
        if capacity < workers:  # more actors than the cluster can place would wait forever
            logging.getLogger(__name__).warning("Ray cluster fits %d of %d workers; using %d", capacity, workers, capacity)
            workers = max(capacity, 1)
        threads = None if options.get("num_gpus") else num_cpus

        started_slots: list[_Slot] = []  # every worker ever started, replacements included, in order

        def start() -> _Slot:
            slot = _Slot(f"worker-{len(started_slots)}", _RemoteWorker.options(**options).remote(spec, threads))
            started_slots.append(slot)
            return slot

        slots.extend(start() for _ in range(workers))
        restarts_left = workers + max_retries if max_restarts is None else max_restarts
        fn_ref = ray.put(fn)  # shipped once, not with every batch
        todo = deque(range(len(batches)))
        attempts = [0] * len(batches)
        running: dict[Any, tuple[_Slot, int, float]] = {}  # ref -> worker, batch, when handed over
        idle: list[_Slot] = []
        retries = 0

        def feed(slot: _Slot) -> None:
            if todo:
                b = todo.popleft()
                running[slot.actor.run.remote(fn_ref, batches[b], batch_timeout)] = (slot, b, time.perf_counter())
            else:
                idle.append(slot)

        for slot in slots:
            feed(slot)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            slot, b, since = running.pop(ref)
            try:
                records, busy, (slot.node, slot.pid) = ray.get(ref)
            except RayTaskError as exc:  # fn or spec.build raised: the same error would follow on any worker
                if isinstance(exc.cause, GuardprobError):
                    raise exc.cause from None  # as in-process (InputError, ModelLoadError ...), without Ray's wrapping
                raise
            except RayActorError as exc:
                if exc.actor_init_failed:  # a spec that cannot be built fails the same on every worker
                    raise BackendError(f"Ray worker {slot.name} could not build the classifier: {exc}") from None
                slot.failures += 1
                attempts[b] += 1
                if attempts[b] > max_retries:
                    overdue = batch_timeout is not None and time.perf_counter() - since >= batch_timeout
                    last = f"no answer within {batch_timeout} s, the worker stopped itself" if overdue else _first_line(exc)
                    raise BackendError(
                        f"batch {b} (examples {_indices(batches[b])}) lost its Ray worker {attempts[b]} times; last: {last}"
                    ) from None
                retries += 1
                todo.appendleft(b)  # the next free worker takes it first
                slots.remove(slot)
                if restarts_left > 0:
                    restarts_left -= 1
                    slots.append(start())
                    idle.append(slots[-1])
                elif not slots:
                    raise BackendError(f"every Ray worker died; batch {b} and {len(todo) - 1} more not scored") from None
                while idle and todo:  # workers that found nothing left to do get the retried batch
                    feed(idle.pop())
                continue
            # a batch is in flight once at a time and goes back to todo only when lost: yielded once
            slot.batches += 1
            slot.examples += len(batches[b])
            slot.busy += busy
            yield records
            feed(slot)
        if on_stats is not None:
            stats = tuple(s.stats() for s in started_slots)
            on_stats(RayStats(address, time.perf_counter() - started, stats, retries, len(started_slots) - workers))
    finally:
        for slot in slots:  # also stops batches still running when the caller stopped early
            ray.kill(slot.actor)
        if owned:
            ray.shutdown()


def connect_ray(address: str, cpus: int) -> bool:
    """Connect to Ray for ``address``; True when this call started the connection (and must end it)."""
    kind = check_address(address, probe=not ray.is_initialized())
    if ray.is_initialized():
        return False
    # No dashboard (extra processes and a port, unused here); worker output stays in the
    # workers' log files rather than under the driver's progress bar. Workers run this same
    # Python (sys.executable), which already imports guardprob, so no runtime_env is needed.
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if kind == "client":
            ray.init(address=address)
        elif kind == "local":
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False, **options)
        elif kind == "auto":
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, include_dashboard=False, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendError(f"could not connect to Ray at {address!r}: {exc}") from None
    return True


def _actor_options(spec: Any, num_cpus: int) -> tuple[dict[str, Any], int]:
    """Actor resources, and how many such actors the cluster holds."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if spec.device.startswith("cuda"):
        if not gpus:
            raise BackendError(f"the spec asks for device {spec.device!r} but the Ray cluster has no GPUs")
        return {"num_gpus": 1, "num_cpus": 1}, gpus
    return {"num_cpus": num_cpus}, int(resources.get("CPU", 0)) // num_cpus


def _indices(batch: Sequence[Any]) -> str:
    found = [getattr(e, "index", None) for e in batch]
    return ", ".join(str(i) for i in found) if None not in found else f"{len(batch)} items"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
