"""Drains the outbox through the uplinks as signed batches, and deletes only on ack.

One loop claims the next events (alarms first) into a batch that is signed once and stored by
the outbox before the first send; it keeps up to `window` batches in flight on the active uplink;
an ack (``ok`` with the matching seq and hash, or ``replay`` with the matching hash: the platform
proves it already holds those exact bytes) deletes the batch's events. Unacked batches are sent
again, byte for byte, after `ack_timeout_s`, after a reconnect, or when the platform reports a gap.

Failover: uplinks are tried in configured order. The preferred one is used whenever it is up;
when it has been down for `failover_after_s`, the next one that is up takes the traffic, and when
the preferred one returns the traffic moves back. In-flight batches are re-sent on the new path;
the platform acks each batch once and dedups.

Path supervision (docs/PROTOCOL.md 7): every uplink that can (`HeartbeatChannel`: MQTT, CoAP)
carries a signed heartbeat every `heartbeat_interval_s`, whether or not it carries the batches,
so that the platform reports a path that went silent within its reporting time. A path is down
for the alarm lane when its connection is lost or, once the platform has answered a heartbeat
on it, when a heartbeat goes unanswered: the alarm lane's batches then go over the next path
that is up at once, not after `failover_after_s` (the bulk lane still waits for it). Both lanes'
chains are per lane, not per path, and the platform behind both paths is one: an alarm batch
re-sent on the other path is stored once (or answered `replay`, which counts as delivered).

Backlog drain is rate-limited by a byte budget (`drain_rate_bytes_per_s`); batches that carry an
alarm bypass it.

The alarm lane (`alarm_lane`, docs/PROTOCOL.md 3.2): alarms go on a hash chain of their own,
sent by a task of their own (over MQTT on a topic of their own), so that an alarm's batch never
waits for the bulk batches ahead of it: not for a claim, a PUBACK or the window here, nor at the
broker or the platform. While the lane has a free slot (`ALARM_WINDOW` batches in flight or
queued), it is offered to the outbox, whose commit signs a group of alarms straight into the
lane's next batch (agent.outbox.batches). Alarms committed while it is not offered are claimed
on the bulk lane first, as without lanes. A platform that does not know lanes refuses the
lane's batches as `malformed`: at the final refusal the lane is turned off and the chain starts
again with those alarms on the bulk lane.

Refusals (docs/PROTOCOL.md 4.3): a batch the platform refuses is sent again after the ack
timeout; at the `MAX_REFUSALS`-th refusal of the same bytes the refusal is taken as final. For
`fork` (the platform holds another chain at this position: a store restored from an old copy,
a cloned card) the chain starts again in a new epoch with every unacknowledged event; for
`malformed` or a reason this gateway does not know, the batch is parked (kept for an operator
with its events) and the rest goes on in a new epoch; for a refused key (`unknown-key`,
`bad-signature`, `wrong-gateway`, `version`: a registration matter no new chain can fix) the
batch is held and sent again at exponentially growing intervals, up to `MAX_HOLD_S`. Each of the
three is raised once per episode: a ``gateway.batch_refused`` alert and `on_refused` (the
runtime's ``audit.batch_refused``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import protocol
from agent.core.types import ALARM, ALERT, TQ_SYNCED, TQ_UNSYNCED, Event
from agent.outbox import DirectClaim, Outbox, OutboxError, PendingBatch
from agent.protocol import ALARM_LANE, BULK_LANE
from agent.protocol.heartbeat import build_heartbeat, decode_heartbeat_answer
from agent.uplink.base import HeartbeatChannel, Uplink, UplinkDownError

__all__ = ["ALARM_WINDOW", "HOLD_REASONS", "MAX_HOLD_S", "MAX_REFUSALS", "RECHAIN_REASONS",
           "Forwarder", "ForwarderStats", "Signer"]

log = structlog.get_logger(__name__)

MAX_REFUSALS = 3  # refusals of the same batch bytes before the refusal counts as final
RECHAIN_REASONS = frozenset({"fork"})
HOLD_REASONS = frozenset({"unknown-key", "bad-signature", "wrong-gateway", "version"})
MAX_HOLD_S = 600.0  # longest wait between two sends of a batch held for a refused key
ALARM_WINDOW = 4  # alarm lane batches in flight or queued before alarms go on the bulk lane


class Signer:
    """Builds and signs batches for one gateway with its Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey, gw: str, wall: Callable[[], float],
                 compress: bool = False) -> None:
        self._key = key
        self.compress = compress
        self.kid = protocol.kid_for(key.public_key())
        self.gw = gw
        self._wall = wall

    def rotate(self, new_key: Ed25519PrivateKey) -> None:
        """Sign every batch built from now on with `new_key` (after its announcement, signed
        with the old key, was acknowledged by the platform)."""
        self._key = new_key
        self.kid = protocol.kid_for(new_key.public_key())

    def heartbeat(self, path: str, after: int) -> tuple[int, bytes]:
        """The next signed heartbeat for `path` after seq `after`: (seq, bytes). The seq is at
        least the wall clock in milliseconds, so that it advances across restarts without a
        stored counter (a clock set back is caught up from the platform's answer)."""
        seq = max(after + 1, int(self._wall() * 1000))
        return seq, build_heartbeat(self._key, self.kid, self.gw, path, seq, self._wall())

    def build(self, seq: int, prev: bytes, bodies: list[bytes], epoch: bytes = b"",
              lane: int = BULK_LANE) -> bytes:
        return protocol.build_batch(
            key=self._key,
            kid=self.kid,
            gw=self.gw,
            seq=seq,
            prev=prev,
            created=self._wall(),
            encoded_events=bodies,
            epoch=epoch,
            compress=self.compress,
            lane=lane,
        )


@dataclass(slots=True)
class ForwarderStats:
    batches_sent: int = 0
    batches_resent: int = 0
    batches_acked: int = 0
    events_acked: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    active_uplink: str | None = None
    active_transport: str | None = None  # "mqtt" / "coap": the kind of the active uplink
    last_ack_at: float | None = None
    last_acked_seq: int = 0  # the bulk lane's
    chain_restarts: int = 0
    alarm_lane: bool = False  # alarms go on a lane of their own now
    alarm_batches_acked: int = 0
    alarm_uplink: str | None = None  # the path the alarm lane uses now

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches_sent": self.batches_sent,
            "batches_resent": self.batches_resent,
            "batches_acked": self.batches_acked,
            "events_acked": self.events_acked,
            "rejections": dict(self.rejections),
            "active_uplink": self.active_uplink,
            "active_transport": self.active_transport if self.active_uplink else None,
            "last_ack_at": self.last_ack_at,
            "last_acked_seq": self.last_acked_seq,
            "chain_restarts": self.chain_restarts,
            "alarm_lane": self.alarm_lane,
            "alarm_batches_acked": self.alarm_batches_acked,
            "alarm_uplink": self.alarm_uplink,
        }


@dataclass(slots=True)
class _InFlight:
    batch: PendingBatch
    sent_at: float
    via: str


class _TokenBucket:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(float(max(self.rate, n)), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


class Forwarder:
    def __init__(
        self,
        outbox: Outbox,
        uplinks: Sequence[Uplink],
        signer: Signer,
        *,
        batch_max_events: int = 500,
        batch_max_bytes: int = 256 * 1024,
        ack_mode: str = "platform",
        ack_timeout_s: float = 15.0,
        window: int = 4,
        drain_rate_bytes_per_s: int = 0,
        batch_linger_s: float = 0.0,
        failover_after_s: float = 30.0,
        status_interval_s: float = 30.0,
        status_doc: Callable[[], Mapping[str, Any]] | None = None,
        on_refused: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        synchronized: Callable[[], bool] = lambda: True,
        alarm_lane: bool = True,
    ) -> None:
        if not uplinks:
            raise ValueError("at least one uplink is needed")
        self.outbox = outbox
        self.uplinks = list(uplinks)
        self.signer = signer
        self.batch_max_events = batch_max_events
        self.batch_max_bytes = batch_max_bytes
        self.ack_mode = ack_mode
        self.ack_timeout_s = ack_timeout_s
        self.window = window
        self.batch_linger_s = batch_linger_s
        self.failover_after_s = failover_after_s
        self.status_interval_s = status_interval_s
        self._status_doc = status_doc
        self._bucket = _TokenBucket(drain_rate_bytes_per_s)
        self.stats = ForwarderStats()
        self._unsent: list[PendingBatch] = []  # to send again: alarm lane first, by seq
        self._inflight: dict[int, _InFlight] = {}  # by PendingBatch.key
        self._alarm_fresh: list[PendingBatch] = []  # alarm lane batches not yet sent
        self._wake = asyncio.Event()  # the bulk lane's sender
        self._alarm_wake = asyncio.Event()  # the alarm lane's sender
        self.alarm_lane = alarm_lane
        self._alarm_claim = DirectClaim(batch_max_events, batch_max_bytes, signer.build, 0.0,
                                        ALARM_LANE)
        self._up: dict[str, bool] = {u.name: False for u in self.uplinks}
        self._down_since: dict[str, float] = {u.name: time.monotonic() for u in self.uplinks}
        self._acks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)
        self._active: Uplink | None = None
        self._alarm_via: Uplink | None = None  # the path the alarm lane's batches went on
        self._abandoned: set[asyncio.Task[bool]] = set()  # alarm sends left on a dead path
        # uplinks whose heartbeat went unanswered after the platform had answered one there
        self._hb_down: set[str] = set()
        self._rotation: tuple[Ed25519PrivateKey, int, Callable[[], Awaitable[None]]] | None = None
        self._on_refused = on_refused
        self._synchronized = synchronized  # the time quality of the alerts it records
        self._refusals: dict[bytes, int] = {}  # batch hash -> refusals of those bytes
        self._hold_until = 0.0  # monotonic; no send before (a held batch's backoff)
        self._hold_level = 0  # consecutive final key refusals (0: not holding)
        # a final refusal whose chain restart waits for the other lane to settle (no new batch
        # goes out meanwhile): (batch, reason)
        self._settling: tuple[PendingBatch, str] | None = None
        self._alarm_topic = True  # alarm lane batches on their own topic (False: the platform
        # does not answer there; they go with the rest)
        self._bulk_acked_at = 0.0  # monotonic: the last ack of a bulk lane batch
        outbox.on_commit(self._kick)

    # ------------------------------------------------------------------ public

    async def run(self) -> None:
        """Lives until cancelled."""
        self._unsent = await self.outbox.pending_batches()
        if self._unsent:
            log.info("forwarder.resuming", batches=len(self._unsent),
                     first_seq=self._unsent[0].seq)
        try:
            await self._run_tasks()
        finally:
            for task in list(self._abandoned):
                task.cancel()

    async def _run_tasks(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for up in self.uplinks:
                tg.create_task(self._run_uplink(up), name=f"uplink-{up.name}")
                if isinstance(up, HeartbeatChannel):
                    tg.create_task(self._heartbeat_loop(up, up), name=f"heartbeat-{up.name}")
            tg.create_task(self._send_loop(), name="forwarder-send")
            tg.create_task(self._alarm_loop(), name="forwarder-alarms")
            tg.create_task(self._ack_loop(), name="forwarder-acks")
            tg.create_task(self._status_loop(), name="forwarder-status")

    def rotate_after(self, new_key: Ed25519PrivateKey, event_id: int,
                     then: Callable[[], Awaitable[None]]) -> None:
        """Switch the signing key once the batch holding event `event_id` (the announcement of
        the new key, signed by the old one) is acked; then run `then` (install the key files,
        audit). Batches already signed keep their signature: they are re-sent byte for byte."""
        self._rotation = (new_key, event_id, then)

    # ------------------------------------------------------------------ uplinks

    async def _run_uplink(self, up: Uplink) -> None:
        def on_state(connected: bool) -> None:
            self._up[up.name] = connected
            if not connected:
                self._down_since[up.name] = time.monotonic()
            log.info("uplink.state", uplink=up.name, connected=connected)
            self._kick()

        def on_ack(raw: bytes) -> None:
            try:
                self._acks.put_nowait(raw)
            except asyncio.QueueFull:
                self._count("ack_queue_full")

        await up.run(on_ack, on_state)

    async def _heartbeat_loop(self, up: Uplink, channel: HeartbeatChannel) -> None:
        """Supervise one path (module doc): a signed heartbeat every interval, counted in the
        uplink's counters (status.json): sent, acked, failed (unanswered or not sent), refused
        (answered with a refusal: logged; a `replay` refusal names the platform's last seq, and
        the next heartbeat goes at once above it)."""
        path = up.name.split(":", 1)[0]
        for k in ("heartbeats_sent", "heartbeats_acked", "heartbeats_failed",
                  "heartbeats_refused"):
            up.counters.setdefault(k, 0)
        seq = 0
        answered = False  # the platform answers heartbeats on this path
        retried = False
        while True:
            seq, data = self.signer.heartbeat(path, seq)
            h = hashlib.sha256(data).digest()
            up.counters["heartbeats_sent"] += 1
            try:
                answer = decode_heartbeat_answer(
                    await channel.heartbeat(data, functools.partial(_answers, h=h)))
            except UplinkDownError as exc:
                up.counters["heartbeats_failed"] += 1
                if answered and up.name not in self._hb_down:
                    self._hb_down.add(up.name)
                    log.warning("forwarder.heartbeat_unanswered", uplink=up.name,
                                error=str(exc))
                    self._kick()
            else:
                if answer.ok:
                    up.counters["heartbeats_acked"] += 1
                    answered = True
                    if up.name in self._hb_down:
                        self._hb_down.discard(up.name)
                        log.info("forwarder.heartbeat_answered", uplink=up.name)
                        self._kick()
                else:
                    up.counters["heartbeats_refused"] += 1
                    log.warning("forwarder.heartbeat_refused", uplink=up.name, seq=seq,
                                reason=answer.err, last=answer.last)
                    if answer.err == "replay" and answer.last is not None and not retried:
                        seq, retried = max(seq, answer.last), True
                        continue
            retried = False
            await asyncio.sleep(channel.heartbeat_interval_s)

    def _sound(self, up: Uplink) -> bool:
        """Up, and not silently dead: its heartbeats are answered (or never were)."""
        return bool(self._up.get(up.name)) and up.connected and up.name not in self._hb_down

    def _alarm_uplink(self) -> Uplink | None:
        """The alarm lane's path: the active one while it is sound, else at once the first
        other sound one (no `failover_after_s` for alarms)."""
        act = self._active
        if act is not None and self._sound(act):
            return act
        return next((u for u in self.uplinks if u is not act and self._sound(u)), None)

    def _choose(self) -> Uplink | None:
        """The first uplink in order that is up. A down uplink is skipped only once it has been
        down for `failover_after_s`: a short blip waits for the preferred path instead of
        flapping to the next one."""
        now = time.monotonic()
        for up in self.uplinks:
            if self._up.get(up.name) and up.connected:
                return up
            if now - self._down_since.get(up.name, now) < self.failover_after_s:
                return None
        return None

    # ------------------------------------------------------------------ sending

    async def _send_loop(self) -> None:
        direct = DirectClaim(self.batch_max_events, self.batch_max_bytes, self.signer.build,
                             self.batch_linger_s)
        while True:
            self.outbox.offer_direct(None)
            up = self._choose()
            if up is None:
                self.stats.active_uplink = None
                await self._wait(1.0)
                continue
            if up is not self._active:
                if self._active is not None:
                    log.warning("forwarder.path_changed", old=self._active.name, new=up.name)
                self._active = up
                self._requeue_all()
            self.stats.active_uplink = up.name
            self.stats.active_transport = up.name.split(":", 1)[0]
            held = self._hold_until - time.monotonic()
            if held > 0:
                await self._wait(held)
                continue
            self._requeue_expired()
            progressed = False
            # One slot beyond the window is kept for alarms on the bulk lane: an alarm's batch
            # never waits for an ack of the backlog's batches (bench/README.md).
            while (bulk := self._in_flight(BULK_LANE)) < self.window or (
                bulk < self.window + 1 and self.outbox.alarm_waiting
            ):
                batch = await self._next_batch()
                if batch is None:
                    break
                if batch.top_priority > ALARM:
                    await self._bucket.take(len(batch.data))
                # In flight before the send: an uplink may hand over the ack inside send()
                # (CoAP answers in the response), and that ack must find its batch.
                if not await self._send(up, batch):
                    break
                progressed = True
            if not progressed:
                if (up.connected and self._in_flight(BULK_LANE) <= self.window
                        and self._settling is None):
                    # The next commit may sign its events straight into a batch (no claim
                    # transaction; agent.outbox.batches): with the window full, only an alarm
                    # can, for the slot kept for alarms (nothing else may pass the backlog).
                    self.outbox.offer_direct(direct)
                await self._wait(self._next_timeout())

    async def _send(self, up: Uplink, batch: PendingBatch) -> bool:
        """Send one batch on `up`; False (the batch queued to go again) when the uplink is
        down."""
        # In flight before the send: an uplink may hand over the ack inside send() (CoAP
        # answers in the response), and that ack must find its batch.
        flight = _InFlight(batch, time.monotonic(), up.name)
        if self.ack_mode != "broker":
            self._inflight[batch.key] = flight
        try:
            await up.send(batch.seq, batch.data,
                          lane=batch.lane if self._alarm_topic else BULK_LANE)
        except UplinkDownError as exc:
            log.info("forwarder.send_failed", uplink=up.name, seq=batch.seq, lane=batch.lane,
                     error=str(exc))
            if self._inflight.get(batch.key) is flight:
                del self._inflight[batch.key]
                self._unsend(batch)
            elif self.ack_mode == "broker":
                self._unsend(batch)
            # else: already queued again, or in flight on another path (an alarm's, moved)
            self._up[up.name] = up.connected
            if not up.connected:
                self._down_since[up.name] = time.monotonic()
            return False
        self.stats.batches_sent += 1
        if self.ack_mode == "broker":
            await self._acked(batch, via="broker")
        return True

    def _unsend(self, batch: PendingBatch) -> None:
        if all(b.key != batch.key for b in self._unsent):
            self._unsent = sorted([*self._unsent, batch], key=lambda b: (-b.lane, b.seq))

    def _in_flight(self, lane: int) -> int:
        return sum(1 for f in self._inflight.values() if f.batch.lane == lane)

    def _kick(self) -> None:
        """Wake both senders (a commit, an ack, an uplink's state, a re-queue)."""
        self._wake.set()
        self._alarm_wake.set()

    async def _wait(self, seconds: float, wake: asyncio.Event | None = None) -> None:
        wake = self._wake if wake is None else wake
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: 3.11 can lose a cancel there
                await wake.wait()
        wake.clear()

    # ------------------------------------------------------------------ the alarm lane

    async def _alarm_loop(self) -> None:
        """Sends the alarm lane's batches, in seq order, on the active uplink (chosen by the
        bulk sender), up to `ALARM_WINDOW` at a time; offers the lane to the outbox while it
        has room."""
        while True:
            self._alarm_fresh += self.outbox.take_alarm_batches()
            up = self._alarm_uplink()
            self.stats.alarm_uplink = None if up is None else up.name
            if up is not None and up is not self._alarm_via:
                if self._alarm_via is not None:
                    log.warning("forwarder.alarm_path_changed", old=self._alarm_via.name,
                                new=up.name)
                    # what went on the old path may be lost with it: the same bytes again
                    self._requeue_lane(ALARM_LANE)
                self._alarm_via = up
            if self._offer_alarm_lane() and up is not None:
                while self._in_flight(ALARM_LANE) < ALARM_WINDOW:
                    batch = self._next_alarm_batch()
                    if batch is None or not await self._send_alarm(up, batch):
                        break
                    self._alarm_fresh += self.outbox.take_alarm_batches()
                self._offer_alarm_lane()  # with the lane's new load
            await self._wait(1.0, self._alarm_wake)

    async def _send_alarm(self, up: Uplink, batch: PendingBatch) -> bool:
        """`_send` that gives up waiting when `up` stops being the alarm path (a PUBACK that
        will never come through a black hole): the batch then goes again on the new path at
        once, and the abandoned send ends by itself (it fails when the connection does)."""
        task = asyncio.create_task(self._send(up, batch), name=f"alarm-send-{batch.seq}")
        while True:
            woken = asyncio.ensure_future(self._alarm_wake.wait())
            try:
                await asyncio.wait({task, woken}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()  # the forwarder is stopping
                raise
            finally:
                woken.cancel()
            if task.done():
                return task.result()
            self._alarm_wake.clear()
            if self._alarm_uplink() is not up:
                self._abandoned.add(task)
                task.add_done_callback(self._abandoned.discard)
                return False

    def _offer_alarm_lane(self) -> bool:
        """Offer the alarm lane to the outbox while it has room; True when the active uplink
        can take the lane's batches now."""
        up = self._alarm_uplink()
        ready = (up is not None and up.connected and self._up.get(up.name, False)
                 and self._hold_until <= time.monotonic())
        self.stats.alarm_lane = bool(self.alarm_lane and ready and self._settling is None
                                     and self._queued(ALARM_LANE) < ALARM_WINDOW)
        self.outbox.offer_alarm_lane(self._alarm_claim if self.stats.alarm_lane else None)
        return ready

    def _queued(self, lane: int) -> int:
        """Batches of `lane` in flight, to send again, or (alarm lane) not yet sent."""
        return (self._in_flight(lane) + sum(1 for b in self._unsent if b.lane == lane)
                + (len(self._alarm_fresh) if lane == ALARM_LANE else 0))

    def _next_alarm_batch(self) -> PendingBatch | None:
        for i, b in enumerate(self._unsent):
            if b.lane == ALARM_LANE:
                self.stats.batches_resent += 1
                return self._unsent.pop(i)
        return self._alarm_fresh.pop(0) if self._alarm_fresh else None

    def _next_timeout(self) -> float:
        if not self._inflight:
            return 5.0
        oldest = min(f.sent_at for f in self._inflight.values())
        return max(0.05, oldest + self.ack_timeout_s - time.monotonic())

    async def _next_batch(self) -> PendingBatch | None:
        """The bulk lane's next batch: one to send again, or a new claim."""
        for i, b in enumerate(self._unsent):
            if b.lane == BULK_LANE:
                self.stats.batches_resent += 1
                return self._unsent.pop(i)
        if self._settling is not None:
            return None  # no new batch until the chain restart it waits for
        # Let the batch fill; an alarm or a full batch ends the wait at once (every commit
        # wakes us, and linger_remaining is 0 then).
        while (wait := self.outbox.linger_remaining(self.batch_linger_s,
                                                    self.batch_max_events)) > 0:
            await self._wait(wait)
        try:
            return await self.outbox.claim_batch(
                self.batch_max_events, self.batch_max_bytes, self.signer.build
            )
        except OutboxError as exc:
            # The store could not record a new batch (disk full even after the reserve):
            # nothing was claimed; try again shortly rather than stop forwarding.
            log.error("forwarder.claim_failed", error=str(exc))
            self._count("claim_failed")
            await asyncio.sleep(1.0)
            return None

    def _requeue_all(self) -> None:
        if self._inflight:
            self._unsent = sorted([f.batch for f in self._inflight.values()] + self._unsent,
                                  key=lambda b: (-b.lane, b.seq))
            self._inflight.clear()
            self._alarm_wake.set()

    def _requeue_lane(self, lane: int) -> None:
        moved = [k for k, f in self._inflight.items() if f.batch.lane == lane]
        for k in moved:
            self._unsend(self._inflight.pop(k).batch)

    def _requeue_expired(self) -> None:
        now = time.monotonic()
        expired = [s for s, f in self._inflight.items() if now - f.sent_at >= self.ack_timeout_s]
        if self._alarm_topic and any(
                f.batch.lane == ALARM_LANE and f.sent_at < self._bulk_acked_at
                for s, f in self._inflight.items() if s in expired):
            # Unanswered while the bulk lane was answered: the platform does not read the alarm
            # topic (one from before lanes). Its batches go on the bulk topic from now on, where
            # such a platform refuses them as malformed and the lane is turned off.
            log.warning("forwarder.alarm_topic_unanswered",
                        advice="the platform does not read the alarm topic; alarm lane batches "
                        "go on the batch topic (docs/PROTOCOL.md 5)")
            self._alarm_topic = False
        if expired:
            log.info("forwarder.ack_timeout", seqs=expired[:8])
            # Resend everything from the oldest expired on: the platform accepts in order only.
            self._requeue_all()

    # ------------------------------------------------------------------ acks

    async def _ack_loop(self) -> None:
        while True:
            raw = await self._acks.get()
            try:
                ack = protocol.decode_ack(raw)
            except protocol.ProtocolError as exc:
                self._count("malformed_ack")
                log.warning("forwarder.bad_ack", error=str(exc), size=len(raw))
                continue
            # Matched by `h` (docs/PROTOCOL.md 4): the seq names a batch in one of two lanes,
            # and a refusal of bytes the platform could not read has seq 0.
            batch = next((b for b in (*(f.batch for f in self._inflight.values()),
                                      *self._unsent) if b.hash == ack.h), None)
            if batch is None:
                flight = self._inflight.get(ack.seq)  # a bulk batch of that seq, other bytes
                self._count("unknown_ack" if flight is None else "ack_hash_mismatch")
                if flight is not None:
                    log.error("forwarder.ack_hash_mismatch", seq=ack.seq)
                continue
            if ack.ok or ack.err == "replay":
                self._unsent = [b for b in self._unsent if b.key != batch.key]
                self._inflight.pop(batch.key, None)
                self._refusals.pop(batch.hash, None)
                self._hold_level, self._hold_until = 0, 0.0
                await self._acked(batch, via="platform")
                if self._settling is not None:
                    # an answer from the other lane may be what the chain restart waits for
                    if self._settling[0].key == batch.key:
                        self._settling = None  # accepted after all: nothing to restart
                    else:
                        await self._refused_for_good(*self._settling)
                continue
            err = ack.err or "unspecified"
            self._count(err)
            if err == "gap":
                # The platform missed an earlier batch (lost in a broker restart): resend all.
                log.warning("forwarder.platform_gap", seq=ack.seq)
                self._requeue_all()
            else:
                n = self._refusals[batch.hash] = self._refusals.get(batch.hash, 0) + 1
                log.error(
                    "forwarder.batch_rejected",
                    seq=ack.seq,
                    lane=batch.lane,
                    reason=err,
                    refusals=n,
                    advice="the platform refuses this gateway's batches; check the registered "
                    "key (`branch-agent status` shows the kid) and the gateway id",
                )
                # Keep the batch (never delete unacked events); retry after the ack timeout,
                # until the refusal counts as final.
                if n >= MAX_REFUSALS:
                    await self._refused_for_good(batch, err)
                elif self._settling is not None and self._settling[0].key != batch.key:
                    await self._refused_for_good(*self._settling)
            self._kick()

    async def _refused_for_good(self, batch: PendingBatch, err: str) -> None:
        if err in HOLD_REASONS:
            self._hold_level += 1
            wait = min(self.ack_timeout_s * 2 ** self._hold_level, MAX_HOLD_S)
            self._hold_until = time.monotonic() + wait
            self._refusals[batch.hash] = 0  # counted again after the wait
            log.error("forwarder.batch_held", seq=batch.seq, reason=err, next_try_s=wait)
            if self._hold_level == 1:  # once per episode
                info: dict[str, Any] = {"seq": batch.seq, "hash": batch.hash.hex(),
                                        "err": err, "action": "held"}
                with contextlib.suppress(OutboxError):
                    await self.outbox.append(Event(src="gateway", type="gateway.batch_refused",
                                                   v=info, t=time.time(), prio=ALERT,
                                                   tq=TQ_SYNCED if self._synchronized()
                                                   else TQ_UNSYNCED))
                await self._report_refused(info)
            return
        rechain = err in RECHAIN_REASONS
        if batch.lane == ALARM_LANE and not rechain and self.alarm_lane:
            # A platform that does not know lanes: the alarms go again on the bulk lane.
            log.error("forwarder.alarm_lane_off", seq=batch.seq, reason=err,
                      advice="the platform refuses the alarm lane's batches; alarms go on the "
                      "bulk lane from now on (set [forwarder] alarm_lane = false for a "
                      "platform without lanes, docs/PROTOCOL.md 3.2)")
            self.alarm_lane = False
            self._kick()  # withdraw the offer
        if batch.lane == ALARM_LANE and not self.alarm_lane:
            rechain = True
        refused_too = frozenset(h for h, n in self._refusals.items() if n > 0)
        try:
            restarted = await self.outbox.restart_chain(batch, err, park=not rechain,
                                                        refused_too=refused_too)
        except OutboxError as exc:
            log.error("forwarder.restart_failed", seq=batch.seq, error=str(exc))
            return
        if restarted is None:
            # An older batch of its lane, or a batch of the other lane, may still be accepted:
            # no new batch goes out until each has its answer (then this is tried again).
            if self._settling is None:
                log.info("forwarder.restart_waits", seq=batch.seq, lane=batch.lane, reason=err)
            self._settling = (batch, err)
            return
        self._settling = None
        info = restarted
        # Every stored batch was dissolved: what was in flight or queued is gone with them.
        self._inflight.clear()
        self._unsent = []
        self._alarm_fresh = []
        self._refusals.clear()
        self.stats.chain_restarts += 1
        log.error("forwarder.chain_restarted", seq=batch.seq, reason=err,
                  action=info["action"], events=info["count"], epoch=info["new_epoch"])
        await self._report_refused(info)

    async def _report_refused(self, info: dict[str, Any]) -> None:
        if self._on_refused is None:
            return
        try:
            await self._on_refused(info)
        except Exception:  # the audit trail reports its own failures; forwarding goes on
            log.exception("forwarder.on_refused_failed")

    async def _acked(self, batch: PendingBatch, via: str) -> None:
        try:
            deleted = await self.outbox.ack_batch(batch.seq, batch.hash, batch.lane)
        except OutboxError as exc:
            # A full or read-only disk: the events stay stored; the batch is sent again and
            # the platform's `replay` ack retries the delete. Never stop the agent for this.
            log.error("forwarder.ack_store_failed", seq=batch.seq, error=str(exc))
            self._unsend(batch)
            await asyncio.sleep(1.0)  # not a busy loop of resends while the disk is unwritable
            return
        if deleted:
            self.stats.batches_acked += 1
            self.stats.events_acked += batch.count
            self.stats.last_ack_at = time.time()
            if batch.lane == BULK_LANE:
                self._bulk_acked_at = time.monotonic()
                self.stats.last_acked_seq = max(self.stats.last_acked_seq, batch.seq)
            else:
                self.stats.alarm_batches_acked += 1
            log.debug("forwarder.acked", seq=batch.seq, events=batch.count, via=via)
            if self._rotation is not None:
                await self._maybe_rotate(batch)
        self._kick()

    async def _maybe_rotate(self, batch: PendingBatch) -> None:
        assert self._rotation is not None
        new_key, event_id, then = self._rotation
        ids = {e["id"] for e in protocol.decode_batch(batch.data)[0].events}
        if event_id not in ids:
            return
        self._rotation = None
        self.signer.rotate(new_key)
        log.warning("forwarder.key_rotated", kid=self.signer.kid.hex(), announced_in=batch.seq)
        await then()

    def _count(self, what: str) -> None:
        self.stats.rejections[what] = self.stats.rejections.get(what, 0) + 1

    # ------------------------------------------------------------------ status

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval_s)
            if self._status_doc is None:
                continue
            doc = self._status_doc()
            for up in self.uplinks:
                if up.connected:
                    try:
                        await up.publish_status(doc)
                    except (UplinkDownError, OSError) as exc:
                        log.debug("forwarder.status_failed", uplink=up.name, error=str(exc))


def _answers(raw: bytes, h: bytes) -> bool:
    """Whether `raw` is the platform's answer to the heartbeat whose hash is `h`."""
    try:
        return decode_heartbeat_answer(raw).h == h
    except protocol.ProtocolError:
        return False
