"""The chain rules of docs/PROTOCOL.md 4.1 after the signature's, as one pure function: the
store reads what they need (inside its write transaction) into a `ChainState`, and
`check_chain` says whether the batch extends its lane's chain or why not. Shared by the SQLite
store (`Receiver`) and the PostgreSQL one (`branchsim.platform.pgstore`), so that both
platforms accept and refuse exactly the same batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.protocol import ZERO_HASH, Ack, Batch, ProtocolError

__all__ = ["BatchStore", "ChainState", "check_chain"]


class BatchStore(Protocol):
    """A platform store as its front ends (MQTT, CoAP, the NATS bus, the CLI) use it: the SQLite
    `Receiver` or the PostgreSQL `PgReceiver`. Thread-safe."""

    lanes: bool

    def register(self, gw: str, pubkey_pem: bytes) -> bytes: ...

    def handle_batch(self, data: bytes, topic_gw: str | None = None, *,
                     gap_wait_s: float = 0.0, urgent: bool = False) -> Ack: ...

    def events(self, gw: str | None = None) -> list[dict[str, Any]]: ...

    def public_key(self, kid: bytes) -> Ed25519PublicKey | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ChainState:
    """The store as the batch's checks see it.

    `registered_gw`: the gateway the batch's kid is registered to (None: not registered, or
    retired since the signature was checked). `current_epoch`: the gateway's newest epoch (None
    before its first batch). `head`: (seq, hash) of the batch's lane in the current epoch ((0,
    zero hash) while the lane has no batch in it). `epoch_known`: the batch's epoch was started
    before. `stored_hash()`: the hash of the batch stored at the batch's (gw, epoch, lane, seq),
    or None; called only to tell a replay from a fork."""

    registered_gw: str | None
    current_epoch: bytes | None
    head: tuple[int, bytes]
    epoch_known: bool
    stored_hash: Callable[[], bytes | None]


def check_chain(batch: Batch, topic_gw: str | None, state: ChainState) -> None:
    """Raise ProtocolError (unknown-key, wrong-gateway, replay, fork, gap) unless `batch` is the
    next of its lane's chain, or the first batch of a new epoch."""
    if state.registered_gw is None:
        raise ProtocolError("unknown-key", f"kid {batch.kid.hex()} is not registered")
    if batch.gw != state.registered_gw:
        raise ProtocolError("wrong-gateway",
                            f"key of {state.registered_gw!r} signed for {batch.gw!r}")
    if topic_gw is not None and topic_gw != batch.gw:
        raise ProtocolError("wrong-gateway", f"batch of {batch.gw!r} on {topic_gw!r} topic")
    if batch.epoch == state.current_epoch:
        last_seq, last_hash = state.head
    else:
        if state.epoch_known:
            _replay_or(batch, state, "fork", f"epoch {batch.epoch.hex()} was replaced")
        last_seq, last_hash = 0, ZERO_HASH  # a new chain: it must start at seq 1
    where = f"lane {batch.lane} seq {batch.seq}"
    if batch.seq <= last_seq:
        _replay_or(batch, state, "fork", f"{where} <= head {last_seq}, other bytes")
    if batch.seq > last_seq + 1:
        raise ProtocolError("gap", f"{where} after head {last_seq}")
    if batch.prev != last_hash:
        raise ProtocolError("fork", f"{where}: prev does not match head")


def _replay_or(batch: Batch, state: ChainState, reason: str, detail: str) -> None:
    """Raise `replay` if these exact bytes are stored, else `reason`."""
    if state.stored_hash() == batch.hash:
        raise ProtocolError("replay", f"lane {batch.lane} seq {batch.seq} already accepted")
    raise ProtocolError(reason, detail)
