"""The projector's lifecycle: connect, run its loops under a supervisor, stop gracefully.

Each stream type has its projection (`orders`, `customers`). The work is split by job:

* `projector.planning`: pure batch planning (decode, fold, derived-view plan, checkpoints);
* `projector.consumer`: JetStream (the stream's partitions, one durable pull consumer each; fetch, settle, gauges);
* `projector.partitions`: which partitions this replica owns (leases), one worker per owned partition;
* `projector.pipeline`: one batch against MongoDB (load, apply, write, derived views, parks, checkpoints);
* `projector.repair`: resuming parked streams (here from their held copies; `cqrs dead-letters` from PostgreSQL);
* `projector.maintenance`: the periodic loops beside the consume loop (resuming parks, sweeping sales tags);
* this module: the loops and their supervision.

The loops run under `core.supervisor.Supervisor`: `consume` (the partition owner and its workers: fetch ->
pipeline -> settle), `consumer-gauges`, and `projector.maintenance`'s `resume-parked` and `sweep-sales-tags`. An
unexpected end is logged with its traceback and the loop restarts with backoff; while an essential loop is down
the projector's health is NOT_SERVING. A MongoDB outage naks the batch with a bounded backoff and pauses fetching
until MongoDB answers (`projector.mongo_watch`); the version guard makes every redelivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from nats.aio.msg import Msg
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from core.dependency_metrics import dependency_metrics
from core.error_text import describe_error
from core.events import decode_event
from core.failpoints import failpoint
from core.jetstream import JETSTREAM_UNAVAILABLE
from core.projections import Projection
from core.subjects import stream_subjects
from core.supervisor import Supervisor, all_unless_one_fails
from projector.applier import BatchApplier
from projector.batch_gate import BatchGate
from projector.config import ProjectorSettings
from projector.consumer import STRAYS, JetStreamConsumer, PullSource, apply_spans, settle_all, settle_outcome
from projector.generation_writer import GenerationWriter
from projector.health import ProjectorHealth, ProjectorStats, log_summary
from projector.leases import PartitionLeases
from projector.maintenance import Maintenance
from projector.metrics import ProjectorMetrics
from projector.mongo_client import read_model_client
from projector.mongo_watch import MongoWatch
from projector.mongo_writer import MongoDocument
from projector.partitions import Fence, PartitionOwner, WorkerNotStarted
from projector.pipeline import Pipeline
from projector.planning import Decoder, decode_messages, delivered
from projector.registry import PROJECTIONS, registry_versions
from projector.repair import Repairer

log = logging.getLogger(__name__)

# The read models this projector keeps (the shared registry).
DEFAULT_PROJECTIONS: tuple[Projection, ...] = PROJECTIONS

# A worker whose lease is not (yet) renewed looks again this often instead of fetching.
FENCE_WAIT_SECONDS = 0.2
CONSUME = "consume"
RESUME_PARKED = "resume-parked"
CONSUMER_GAUGES = "consumer-gauges"
SWEEP_SALES_TAGS = "sweep-sales-tags"


class Projector:
    """Runs the projections from a durable JetStream pull consumer into MongoDB.

    `start()` connects, makes sure the stream and the consumer exist and starts the supervised loops; `stop()`
    lets the consume loop finish (write and ack) the batch in hand, then stops the loops and closes the
    connections. Several replicas may share the durable consumer: the version guard keeps them from
    overwriting each other. `projections` and `decoder` are what this build knows (a test builds an older or a
    newer projector with them).
    """

    def __init__(
        self,
        settings: ProjectorSettings,
        *,
        projections: Sequence[Projection] = DEFAULT_PROJECTIONS,
        decoder: Decoder = decode_event,
    ) -> None:
        self._settings = settings
        self._projections = {p.stream_type: p for p in projections}
        self._decoder = decoder
        self.stats = ProjectorStats()
        self.health = ProjectorHealth()
        self.metrics = ProjectorMetrics()
        self._deps = dependency_metrics(self.metrics.registry)
        self.consumer = JetStreamConsumer(settings, self._deps, self.metrics)
        self._mongo: AsyncMongoClient[MongoDocument] | None = None
        self._pipeline: Pipeline | None = None
        self._repairer: Repairer | None = None
        self.supervisor: Supervisor | None = None
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()
        self._indexes_ready = False
        self._generations: GenerationWriter | None = None
        self._read_model = MongoWatch(
            self.stats,
            self.metrics,
            settings.projector_max_backoff_seconds,
            self._sleep,
            on_back=lambda: self._generations.check_soon() if self._generations is not None else None,
        )
        # Batches of several partitions apply at once; a generation switch waits for them (`BatchGate`), and one
        # worker at a time follows the generation (its heartbeat is reported only once the switch is done).
        self._gate = BatchGate()
        # Merged batches bounded by twice a fetch, so that one apply stays well inside the ack wait.
        self._applier = BatchApplier(self.process_batch, self._hand_back, 2 * settings.projector_batch_size)
        self._follow_lock = asyncio.Lock()
        self.owner: PartitionOwner | None = None
        self._maintenance = Maintenance(
            settings,
            self.stats,
            self.metrics,
            self._deps,
            current=self._current,
            sweeps_sales_tags=self._sweeps_sales_tags,
            stopping=self._stopping,
            sleep=self._sleep,
        )

    @property
    def running(self) -> bool:
        return self.supervisor is not None and not self._stopping.is_set()

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics` is served on (None unless `projector_metrics_port` is set)."""
        return self.metrics.port

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "the projector is not started"
        return self._pipeline

    @property
    def database(self) -> str:
        """The database (read-model generation) the projector writes."""
        assert self._generations is not None, "the projector is not started"
        return self._generations.database

    @property
    def writer_id(self) -> str:
        assert self._generations is not None, "the projector is not started"
        return self._generations.writer_id

    def _current(self) -> tuple[Pipeline, Repairer]:
        """The pipeline and the repairer of the generation written now (they change at a cutover)."""
        assert self._pipeline is not None and self._repairer is not None, "the projector is not started"
        return self._pipeline, self._repairer

    def _use_database(self, name: str) -> None:
        """Writes this database from the next batch on (called between batches only)."""
        assert self._mongo is not None
        s = self._settings
        self._pipeline = Pipeline(
            self._mongo[name],
            self._projections,
            self._deps,
            stream_name=s.stream_name,
            park_after=s.projector_park_after_deliveries,
            max_backoff=s.projector_max_backoff_seconds,
            parallel_calls=s.projector_parallel_mongo_calls,
        )
        self._repairer = Repairer(self._pipeline, self._decoder)
        self._indexes_ready = False

    async def _follow_generation(self) -> None:
        """Moves to the active generation if a cutover changed it, then reports (heartbeat) what it writes.

        The switch waits for the batches in flight (`BatchGate.exclusive`): after the report no batch of this
        projector writes the old generation, which is what a cutover waits for. One caller at a time, so that no
        worker reports the new generation before the switch is done. Raises the driver's error when MongoDB is
        down."""
        assert self._generations is not None
        async with self._follow_lock:
            if not self._generations.due(asyncio.get_running_loop().time()):
                return  # another worker just did it
            moved = await self._generations.poll()
            if moved is not None:
                async with self._gate.exclusive():
                    self._use_database(moved)
                    await self.pipeline.ensure_indexes()
                    self._indexes_ready = True
            await self._generations.report(asyncio.get_running_loop().time())

    async def start(self) -> None:
        """Connects and starts the loops.

        Waits for NATS as long as it takes (nats-py retries even the first connection forever; cancel to give
        up). MongoDB may be down: the consume loop waits for it before fetching anything.
        """
        s = self._settings
        self.metrics.serving.set(0)
        try:
            if s.projector_metrics_port is not None:
                # First: while the projector waits for NATS, /metrics already says so (mongo_up 0, no progress).
                self.metrics.serve(s.projector_metrics_port, s.metrics_host)
            names = ", ".join(p.name for p in self._projections.values())
            await self.consumer.connect(f"read model projector: {names}")
            self._mongo = read_model_client(s, f"projector-{s.projector_durable}")
            self._generations = GenerationWriter(
                self._mongo[s.mongo_database], registry_versions(), s.generation_poll_seconds
            )
            self._use_database(s.mongo_database)
        except BaseException:
            self._stopping.set()
            await self._close_connections()
            raise
        self._stopping.clear()
        self._drained.clear()
        supervisor = self.supervisor = Supervisor(
            f"projector {s.projector_durable}",
            on_health_change=self._on_health_change,
            max_backoff=s.projector_max_backoff_seconds,
        )
        self.health.started = True
        supervisor.start(CONSUME, self._consume)
        supervisor.start(RESUME_PARKED, _looping(self._maintenance.resume_parked))
        supervisor.start(CONSUMER_GAUGES, self.consumer.refresh_gauges, essential=False)
        supervisor.start(SWEEP_SALES_TAGS, _looping(self._maintenance.sweep_sales_tags), essential=False)
        await self._on_health_change(supervisor.healthy)
        log.info(
            "projector %s consuming %s (stream %s) into %s (%s)",
            s.projector_durable,
            stream_subjects(s.subject_prefix)[0],
            s.stream_name,
            s.mongo_database,
            ", ".join(p.collection for p in self._projections.values()),
        )

    async def stop(self) -> None:
        """Finishes the batch in hand (write + ack), then stops the loops and closes the connections."""
        self._stopping.set()
        self.consumer.stopping = True
        self.health.started = False
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is None and not self.consumer.connected and self._mongo is None:
            return  # never started, or already stopped
        if supervisor is not None:
            if supervisor.is_up(CONSUME):
                try:
                    await asyncio.wait_for(self._drained.wait(), timeout=self._settings.grace_seconds)
                except TimeoutError:
                    # Release the batch in hand: unacked messages are redelivered; the version guard makes it
                    # harmless.
                    log.warning(
                        "projector: batch not finished within %.1fs; releasing it", self._settings.grace_seconds
                    )
            await supervisor.stop(timeout=self._settings.grace_seconds)
        await self._close_connections()
        log.info("projector %s stopped", self._settings.projector_durable)

    async def wait(self) -> None:
        """Returns when the projector is stopped (its loops restart themselves; they never end it)."""
        await self._stopping.wait()

    async def _close_connections(self) -> None:
        await self.consumer.close()
        if self._mongo is not None and self._generations is not None:
            # Best effort: a cutover would otherwise wait for this writer's heartbeat to expire.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._generations.leave(), timeout=2.0)
        if self._mongo is not None:
            with contextlib.suppress(Exception):
                await self._mongo.close()
            self._mongo = None
        self.metrics.serving.set(0)
        await asyncio.to_thread(self.metrics.close)

    async def _on_health_change(self, healthy: bool) -> None:
        supervisor = self.supervisor
        self.health.loops_up = healthy
        self.health.down = supervisor.down_tasks() if supervisor is not None else []
        self.metrics.serving.set(1 if self.health.serving else 0)
        if not healthy:
            log.error("projector NOT_SERVING: loop(s) down: %s", ", ".join(self.health.down))
            for name in self.health.down:
                self.metrics.loop_restarts.labels(name).inc()

    # ---- the loops ------------------------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Consumes until stop(): this replica's share of the partitions (each through its own worker), or the one
        consumer every replica shares when the stream has no partition mapping; then reports the last batch done
        and waits to be stopped. The workers' batches are applied by one `BatchApplier`."""
        applying = asyncio.create_task(self._applier.run(), name="projector applier")
        consuming = asyncio.create_task(self._consume_sources(), name="projector sources")
        try:
            await asyncio.wait({applying, consuming}, return_when=asyncio.FIRST_COMPLETED)
            if applying.done():  # a bug in an apply: the workers stop, the supervisor logs it and restarts us
                consuming.cancel()
                with contextlib.suppress(BaseException):
                    await consuming
                applying.result()
            consuming.result()
        finally:
            for task in (consuming, applying):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._drained.set()
        await _until_cancelled()

    async def _consume_sources(self) -> None:
        if self.consumer.partitions:
            assert self._mongo is not None and self._generations is not None
            s = self._settings
            leases = PartitionLeases(
                self._mongo[s.mongo_database],
                s.projector_durable,
                self._generations.writer_id,
                s.projector_lease_seconds,
            )
            self.owner = PartitionOwner(
                leases,
                self.consumer.partitions,
                self._start_partition,
                self.metrics,
                self._stopping,
                lease_seconds=s.projector_lease_seconds,
                mongo_ready=lambda: self._read_model.ready(self._probe_mongo),
                mongo_failed=self._read_model.failed,
                every_round=self._generation_followed,
            )
            await self.owner.run()
        else:
            source = await self.consumer.open_source(None)
            try:
                await self._consume_source(source, None)
            finally:
                await self.consumer.close_source(source)

    async def _start_partition(
        self, partition: int, fence: Fence
    ) -> tuple[asyncio.Task[None], Callable[[], Awaitable[None]]]:
        """Partition `partition`'s worker; partition 0's owner also consumes the strays (`consumer.STRAYS`)."""
        sources: list[PullSource] = []

        async def close() -> None:
            for source in sources:
                await self.consumer.close_source(source)

        try:
            for wanted in (partition, STRAYS) if partition == 0 else (partition,):
                sources.append(await self.consumer.open_source(wanted))
        except BaseException as exc:
            await close()  # the partition's source opened, the strays' failed: unsubscribe it too
            if isinstance(exc, JETSTREAM_UNAVAILABLE):
                raise WorkerNotStarted(
                    f"partition {partition}: JetStream is unavailable to open its consumer ({describe_error(exc)})"
                ) from exc
            raise

        async def consume() -> None:
            await all_unless_one_fails(*(self._consume_source(source, fence) for source in sources))

        return asyncio.create_task(consume(), name=f"projector partition {partition}"), close

    async def _consume_source(self, source: PullSource, fence: Fence | None) -> None:
        """Fetch -> apply -> settle from one consumer, until stop() or (a partition's) the fence is released.

        Partitions fetch concurrently; what they fetched is applied in merged batches by the applier, each
        partition's in order; a generation switch happens between batches (`BatchGate`)."""
        while not self._stopping.is_set() and (fence is None or not fence.released):
            failpoint("projector.loop")
            if not await self._read_model.ready(self._probe_mongo):
                continue
            if fence is not None and not fence.holds():
                await self._sleep(FENCE_WAIT_SECONDS)  # the lease is being renewed (or lost): fetch nothing
                continue
            if not await self._generation_checked():
                continue
            msgs = await source.fetch()
            if msgs:
                # A fetch may have waited (or this process may have been paused) past a check: never write a batch
                # to a retired generation (nor, checked by the applier, one of a partition no longer ours).
                if not await self._generation_checked():
                    await self._hand_back(msgs)
                    continue
                await self._applier.submit(msgs, fence)
                self.stats.last_batch_monotonic = asyncio.get_running_loop().time()
            log_summary(self.stats, self._settings.projector_stats_interval_seconds)

    async def _generation_followed(self) -> None:
        """Follows a cutover and reports the generation written, with or without partitions to consume."""
        await self._generation_checked()

    async def _hand_back(self, msgs: Sequence[Msg]) -> None:
        """Naks a fetched batch this worker may not apply (redelivered at once, to whoever may)."""
        self.metrics.naks.inc(len(msgs))
        await settle_all(m.nak() for m in msgs)

    async def _generation_checked(self) -> bool:
        """Follows the active generation when a check is due; False when MongoDB failed (the loop waits for it)."""
        assert self._generations is not None
        if not self._generations.due(asyncio.get_running_loop().time()):
            return True
        try:
            await self._follow_generation()
        except PyMongoError as exc:
            self._read_model.failed(exc)
            return False
        return True

    def _sweeps_sales_tags(self) -> bool:
        """Whether this replica sweeps: the owner of partition 0 (which also consumes the strays), so that N replicas
        do not each read every shard and look every tag up; every replica of a stream without partitions. A replica
        that takes the sweeping over starts with no tag found covered, so it waits the whole grace again: later,
        never sooner."""
        if not self.consumer.partitions:
            return True
        return self.owner is not None and 0 in self.owner.owned

    async def _probe_mongo(self) -> None:
        """Creates the indexes (the first time) or pings; raises the driver's error while MongoDB is down."""
        if not self._indexes_ready:
            await self.pipeline.ensure_indexes()
            self._indexes_ready = True
        else:
            await self.pipeline.ping()

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes up at once when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # ---- one batch ------------------------------------------------------------------------------------------

    async def process_batch(self, msgs: Sequence[Msg]) -> None:
        """Applies one fetched batch to the read model and settles every message in it.

        With tracing on, each message gets a `projector.apply` span continuing its `traceparent` trace; it lasts
        until the message is settled. A MongoDB failure naks the batch with backoff; an unexpected error (a bug)
        naks it with the longest backoff and is raised, for the supervisor to log and restart the loop.
        """
        fetched_at = time.time()
        self.metrics.redeliveries.inc(sum(1 for msg in msgs if delivered(msg) > 1))
        spans = apply_spans(msgs)
        cap = self._settings.projector_max_backoff_seconds
        try:
            decoded = decode_messages(msgs, self._projections, self._settings.subject_prefix, self._decoder)
            started = time.monotonic()
            async with self._gate.batch():
                outcome = await self.pipeline.apply(decoded, spans=spans)
            self.metrics.stages.observe("apply", time.monotonic() - started)
            failpoint("projector.after_write_before_ack")
        except PyMongoError as exc:
            self._read_model.failed(exc)
            self.metrics.naks.inc(len(msgs))
            await settle_all(m.nak(delay=self._read_model.backoff()) for m in msgs)
            return
        except Exception:
            self.metrics.naks.inc(len(msgs))
            await settle_all(m.nak(delay=cap) for m in msgs)
            raise
        finally:
            for span in spans.values():
                span.end()
        started = time.monotonic()
        await settle_outcome(outcome)
        self.metrics.stages.observe("settle", time.monotonic() - started)
        self.metrics.record_stages(outcome, fetched_at)
        self.stats.record_outcome(outcome)
        self.metrics.record_outcome(outcome)
        for park in outcome.parks.values():
            log.warning("parked stream %s at v%s (%s): %s", park.stream_id, park.version, park.kind, park.reason)
        for letter in outcome.dead_letters:
            log.warning("dead-lettered message #%d on %s: %s", letter.stream_seq, letter.subject, letter.reason)


def _looping(loop: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """A periodic loop, supervised: once it returns (the projector stops) it waits for `Supervisor.stop()`."""

    async def run() -> None:
        await loop()
        await _until_cancelled()

    return run


async def _until_cancelled() -> None:
    """A supervised loop that is done waits here for `Supervisor.stop()`: returning would count as a failure."""
    await asyncio.Event().wait()
