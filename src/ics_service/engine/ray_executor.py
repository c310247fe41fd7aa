"""The Ray executor: an execution's items classified by Ray actors on a Ray cluster.

The driver (the `ics` process) lists and registers the items as the local executor does,
then hands chunks of items to the replicas: Ray Core actors, one per model replica, each
holding its own model session and running ICS's own `Pipeline` (pipelined decode and
batched inference) on every chunk it is given. Each replica has at most
`ray_chunks_in_flight` chunks queued on it, which is the whole of the backpressure: the
driver takes the next items from the store only when a replica has room. Results come back
per chunk and go through the runner's one recorder, exactly as the local executor's do.

What travels: a chunk is its items' sequence numbers, URIs and manifest fields, never image
bytes. Workers read the sources themselves (S3 keys, URLs, paths), with the credentials of a
URI that had them (kept in the driver's memory only, never in the store). A local file
travels as its path: a replica that cannot find the path on its node answers so (it is not
an error there), and the driver then reads that file itself and sends its bytes, so a
cluster without the driver's disk still classifies it; a replica that sees a different file
at the same path classifies that one (use a shared file system or S3 on a real cluster).

Faults: a replica's worker or node that dies loses its chunks in flight. Ray restarts the
replica (`max_restarts=-1`; elsewhere when its node is gone); the driver sends the lost
chunk again, to a replica that answers, under the ClassifyImage retry policy (the error is
`WorkerLost`); once the policy gives up, the chunk's items end FAILED with it. Chunks are
idempotent: a chunk's results come back whole or not at all, and an item that already has a
result keeps it (the driver drops a second one, and so does the store).

Ray Core actors rather than Ray Data: Ray Data's generic reader ran at 0.4 of ICS's local
rate on this 2-core machine (benchmarks/RESULTS.md). An actor that runs ICS's own pipeline on
chunks of URIs keeps that overlap and moves no image through Ray's object store. No figure
of this executor is published yet (docs/ray.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import sources
from ..config import Settings
from ..errors import EnvironmentUnavailable, ItemError, UsageError, WorkerLost
from ..imaging import Limits, Preprocessor
from ..modelcard import ModelCard
from ..models.runtime import available_cpus
from ..policies import delay_seconds, matches
from ..types import ErrorInfo, Item, ItemResult, Step, utcnow
from .pipeline import Emit, Pipeline, plan_batches
from .results import item_result

log = logging.getLogger(__name__)

#: The object store of a Ray started for one run: chunks and results are small.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024
#: How long the driver waits for any answer before looking at `stop` again.
WAIT_SECONDS = 0.2


class PathUnseen(ItemError):
    """A replica's node has no file at an item's path (the driver then sends its bytes)."""


#: One item as it travels: (seq, stored URI, URI with credentials or None, metadata, bytes
#: or None: the bytes only for a file the replica could not see).
Job = tuple[int, str, str | None, dict[str, Any] | None, bytes | None]


@dataclass(slots=True)
class ChunkAnswer:
    """What a replica sends back for a chunk."""

    results: list[ItemResult]
    #: History events of the pipeline (retries): (type, seq, details).
    events: list[tuple[str, int | None, dict[str, Any]]]
    #: Items whose file the replica's node does not have.
    unseen: list[int]


class Replica:
    """A model replica (a Ray actor): one model session and ICS's own pipeline."""

    def __init__(
        self, settings: Settings, card: ModelCard, execution_id: str, capture: bool
    ) -> None:
        from ..logs import configure_logging
        from ..models.device import device_for
        from ..models.factory import load_runtime
        from ..models.remote import RemoteOptions

        configure_logging(settings.log_level, settings.log_format)
        sources.configure(settings)
        s = settings
        per_replica = max(1, int(s.ray_num_cpus))
        self.runtime = load_runtime(
            card,
            s.models_dir,
            threads=s.inference_threads or 1,
            device=device_for(card.kind, card.name, s.device),
            auto_prepare=False,
            remote=RemoteOptions.of(s),
        )
        batch_size, inference_workers = plan_batches(
            self.runtime,
            batch_size=s.batch_size,
            threads=s.inference_threads or 1,
            workers=s.inference_workers or per_replica,
            remote_concurrency=s.remote_concurrency,
        )
        self._events: list[tuple[str, int | None, dict[str, Any]]] = []
        self._data: dict[str, bytes] = {}
        self._real: dict[str, str] = {}
        self._wanted: set[int] = set()
        self.pipeline = Pipeline(
            runtime=self.runtime,
            preprocess=Preprocessor.for_runtime(self.runtime, Limits.from_settings(s)),
            reader=self._read,
            execution_id=execution_id,
            threshold=s.threshold,
            top_k=s.top_k,
            batch_size=batch_size,
            workers=s.decode_workers or max(2, math.ceil(s.ray_num_cpus)),
            inference_workers=inference_workers,
            retry_read=s.retry[Step.SERIALIZE_IMAGE_DATA],
            retry_classify=s.retry[Step.CLASSIFY_IMAGE],
            on_event=lambda etype, seq, details: self._events.append((etype, seq, details)),
            capture=(lambda item: item.seq in self._wanted) if capture else None,
        )

    def ready(self) -> bool:
        return True

    def _read(self, uri: str, max_bytes: int, *, stop: threading.Event) -> bytes:
        data = self._data.get(uri)
        if data is not None:
            return data
        real = self._real.get(uri, uri)
        if sources.scheme_of(real) == "file" and not os.path.lexists(sources.uri_to_path(real)):
            raise PathUnseen(f"{uri}: no such file on this node")
        return sources.read(real, max_bytes, stop=stop)

    def classify(self, jobs: Sequence[Job], wanted: Sequence[int]) -> ChunkAnswer:
        """Classify one chunk; every item gets its result, except those it cannot see."""
        self._events = []
        self._data = {uri: data for _, uri, _, _, data in jobs if data is not None}
        self._real = {uri: real for _, uri, real, _, _ in jobs if real is not None}
        self._wanted = set(wanted)
        results: list[ItemResult] = []
        items = [Item(seq=seq, uri=uri, metadata=meta) for seq, uri, _, meta, _ in jobs]
        self.pipeline.run(items, results.extend)
        unseen = [
            int(r.item_id)
            for r in results
            if r.error is not None and r.error.type == PathUnseen.__name__
        ]
        kept = [r for r in results if int(r.item_id) not in set(unseen)]
        self._data, self._real = {}, {}
        return ChunkAnswer(kept, self._events, unseen)


def import_ray() -> Any:
    """The `ray` module (the caller checked that it is installed: executor.check_executor)."""
    import ray

    return ray


@contextlib.contextmanager
def connected(ray: Any, settings: Settings) -> Iterator[None]:
    """Ray, connected to `ray_address`, or started on this machine for the run (and shut
    down after it)."""
    address = settings.ray_address
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    if address is None:
        kwargs.update(
            address="local",
            num_cpus=available_cpus(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        )
    else:
        kwargs["address"] = address
    # The driver's modules travel to workers started by a Ray of this run through its
    # environment; a cluster of its own needs ics-service installed on every node.
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise EnvironmentUnavailable(
            f"cannot reach the Ray cluster at {address}: {e}; start it (`ray start --head`) "
            "or fix ray_address / RAY_ADDRESS"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class _Chunk:
    items: list[Item]
    #: Items to send as bytes (their replica could not see the file).
    data: dict[int, bytes] = field(default_factory=dict)
    attempts: int = 1
    not_before: float = 0.0
    replica: int = -1


@dataclass
class RayExecutor:
    """Runs an execution's items on Ray actors (see the module docstring)."""

    settings: Settings
    #: The local pipeline: its settings, history and capture are the run's.
    pipeline: Pipeline
    #: The URI with credentials of a stored URI (itself when it had none).
    resolve: Callable[[str], str]
    rng: random.Random = field(default_factory=random.Random)

    def run(self, items: Iterable[Item], emit: Emit, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        ray = import_ray()
        started = time.perf_counter()
        with connected(ray, self.settings):
            replicas = self._start(ray)
            log.info(
                "Ray: %d replicas ready in %.2f s",
                len(replicas),
                time.perf_counter() - started,
                extra={"execution_id": self.pipeline.execution_id},
            )
            _Dispatch(self, ray, replicas, emit, stop).run(iter(items))

    def _start(self, ray: Any) -> list[Any]:
        s = self.settings
        count = s.ray_replicas
        if not count:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            count = max(1, int(cpus // s.ray_num_cpus))
        actor = ray.remote(Replica).options(
            num_cpus=s.ray_num_cpus,
            max_restarts=-1,
            # The driver sends a lost chunk again, under the ClassifyImage policy.
            max_task_retries=0,
            max_concurrency=1,
            scheduling_strategy="SPREAD",  # replicas on as many nodes as there are
        )
        card = self.pipeline.runtime.card
        capture = self.pipeline.capture is not None
        replicas = [
            actor.remote(s, card, self.pipeline.execution_id, capture) for _ in range(count)
        ]
        try:
            ray.get([r.ready.remote() for r in replicas])
        except ray.exceptions.RayError as e:
            raise UsageError(
                f"the Ray replicas of model {card.name} could not start: {_last_line(e)} (every "
                "node needs ics-service, with the ray extra, and the model in its ICS home)"
            ) from None
        return replicas


def _last_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


class _Dispatch:
    """One run's chunks: sent to replicas with room, answered, retried when lost."""

    def __init__(
        self, ex: RayExecutor, ray: Any, replicas: list[Any], emit: Emit, stop: threading.Event
    ) -> None:
        self.ex = ex
        self.ray = ray
        self.replicas = replicas
        self.emit = emit
        self.stop = stop
        s = ex.settings
        self.chunk_size = s.ray_chunk_size
        self.depth = s.ray_chunks_in_flight
        self.policy = s.retry[Step.CLASSIFY_IMAGE]
        self.load = [0] * len(replicas)
        #: Replicas whose last chunk was lost: nothing is sent to them until they answer.
        self.down: dict[int, Any] = {}
        self.inflight: dict[Any, _Chunk] = {}
        self.retries: deque[_Chunk] = deque()
        self.done: set[int] = set()
        self.listed_all = False
        self.lost = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.NodeDiedError,
        )

    def run(self, items: Iterator[Item]) -> None:
        while True:
            self._fill(items)
            if not self.inflight and (self.stop.is_set() or (self.listed_all and not self.retries)):
                return  # stopped: what was not sent stays pending, for a resume
            waiting = [*self.inflight, *self.down.values()]
            if not waiting:
                time.sleep(WAIT_SECONDS)  # a retry waits for its delay
                continue
            ready, _ = self.ray.wait(waiting, num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                chunk = self.inflight.pop(ref, None)
                if chunk is None:
                    self._answered_ping(ref)
                else:
                    self.load[chunk.replica] -= 1
                    self._answered(ref, chunk)

    def _fill(self, items: Iterator[Item]) -> None:
        while not self.stop.is_set():
            free = [
                i for i, load in enumerate(self.load) if i not in self.down and load < self.depth
            ]
            if not free:
                return
            chunk = self._next_chunk(items)
            if chunk is None:
                return
            self._send(chunk, min(free, key=lambda i: self.load[i]))

    def _next_chunk(self, items: Iterator[Item]) -> _Chunk | None:
        if self.retries and self.retries[0].not_before <= time.monotonic():
            return self.retries.popleft()
        if self.listed_all:
            return None
        taken = list(itertools.islice(items, self.chunk_size))
        if len(taken) < self.chunk_size:
            self.listed_all = True
        return _Chunk(taken) if taken else None

    def _send(self, chunk: _Chunk, replica: int) -> None:
        resolve = self.ex.resolve
        jobs: list[Job] = []
        for item in chunk.items:
            real = resolve(item.uri)
            jobs.append(
                (
                    item.seq,
                    item.uri,
                    None if real == item.uri else real,
                    item.metadata,
                    chunk.data.get(item.seq),
                )
            )
        wants = self.ex.pipeline.capture
        wanted = [] if wants is None else [item.seq for item in chunk.items if wants(item)]
        chunk.replica = replica
        ref = self.replicas[replica].classify.remote(jobs, wanted)
        self.inflight[ref] = chunk
        self.load[replica] += 1

    def _answered(self, ref: Any, chunk: _Chunk) -> None:
        try:
            answer: ChunkAnswer = self.ray.get(ref)
        except self.lost as e:
            self._lost(chunk, e)
            return
        except self.ray.exceptions.RayTaskError as e:
            # A bug on the replica (the pipeline records every item error as a result).
            raise e.as_instanceof_cause() from None
        on_event = self.ex.pipeline.on_event
        if on_event is not None:
            for etype, seq, details in answer.events:
                on_event(etype, seq, details)
        if answer.unseen:
            self._send_bytes(chunk, answer.unseen)
        fresh = [r for r in answer.results if int(r.item_id) not in self.done]
        if len(fresh) < len(answer.results):
            log.info("%d results of a chunk sent again dropped", len(answer.results) - len(fresh))
        self.done.update(int(r.item_id) for r in fresh)
        captured = [r.captured for r in fresh if r.captured is not None]
        reserve = self.ex.pipeline.reserve_capture
        if captured and reserve is not None and not reserve(captured, self.stop):
            for r in fresh:
                r.captured = None
        if fresh:
            self.emit(fresh)

    def _send_bytes(self, chunk: _Chunk, unseen: list[int]) -> None:
        """Read the files a replica could not see here, and send them as bytes."""
        log.info("%d files not on the replica's node: sending their bytes", len(unseen))
        wanted = set(unseen)
        items = [item for item in chunk.items if item.seq in wanted]
        readable: list[Item] = []
        data: dict[int, bytes] = {}
        failed: list[ItemResult] = []
        pipeline = self.ex.pipeline
        for item in items:
            try:
                data[item.seq] = pipeline.reader(
                    item.uri, pipeline.preprocess.limits.max_bytes, stop=self.stop
                )
                readable.append(item)
            except ItemError as e:
                failed.append(self._failed(item, e.info(), 1))
        if failed:
            self.done.update(int(r.item_id) for r in failed)
            self.emit(failed)
        if readable:
            self.retries.appendleft(_Chunk(readable, data=data))

    def _lost(self, chunk: _Chunk, e: BaseException) -> None:
        error = WorkerLost(f"the Ray worker of this item's chunk was lost: {_last_line(e)}")
        replica = chunk.replica
        if replica not in self.down:
            log.warning("Ray replica %d lost a chunk of %d items: %s", replica, len(chunk.items), e)
            self.down[replica] = self.replicas[replica].ready.remote()
        if matches(self.policy, error) and chunk.attempts <= self.policy.max_attempts:
            delay = delay_seconds(self.policy, chunk.attempts, self.ex.rng)
            on_event = self.ex.pipeline.on_event
            if on_event is not None:
                on_event(
                    "TaskRetried",
                    None,
                    {
                        "step": Step.CLASSIFY_IMAGE.value,
                        "error": error.type,
                        "cause": str(error),
                        "attempt": chunk.attempts,
                        "delay_s": round(delay, 3),
                        "items": len(chunk.items),
                    },
                )
            chunk.attempts += 1
            chunk.not_before = time.monotonic() + delay
            self.retries.append(chunk)
            return
        results = [
            self._failed(item, error.info(), chunk.attempts)
            for item in chunk.items
            if item.seq not in self.done
        ]
        self.done.update(int(r.item_id) for r in results)
        if results:
            self.emit(results)

    def _answered_ping(self, ref: Any) -> None:
        replica = next(i for i, r in self.down.items() if r == ref)
        try:
            self.ray.get(ref)
        except self.lost:
            # Not back yet (or its node is gone and no other has room): ask again soon.
            time.sleep(WAIT_SECONDS)
            self.down[replica] = self.replicas[replica].ready.remote()
            return
        log.info("Ray replica %d is back", replica)
        del self.down[replica]

    def _failed(self, item: Item, error: ErrorInfo, attempts: int) -> ItemResult:
        p = self.ex.pipeline
        return item_result(
            item.uri,
            error,
            threshold=p.threshold,
            model=p.model_ref,
            started_at=utcnow(),
            execution_id=p.execution_id,
            item_id=item.item_id,
            attempts=attempts,
            metadata=item.metadata,
        )
