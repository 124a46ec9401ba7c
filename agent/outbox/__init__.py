"""The durable outbox: the only writer of the agent's SQLite file.

Invariants
----------
1. *Accepted means committed.* `Outbox.append` resolves after the transaction holding the event
   has committed (WAL, ``synchronous=FULL``), and not before. Appends are group-committed: a
   group is taken every `commit_interval` seconds or `commit_max` events, whichever comes
   first, so the cost of one fsync is shared; an alarm's group commits at once.
2. *Ids are strictly increasing and never reused*, also after deletes, restarts and the
   quarantine of a corrupt store: they are assigned at commit from ``meta.next_id``, updated in
   the same transaction, and ``chain.json`` holds an id floor, written before any id passes it,
   from which a fresh store starts.
3. *An event leaves the store in one of two ways only*: with the acknowledgement of the batch
   holding it (matching seq and hash), or evicted by the quota (or a full disk) in the same
   transaction as a ``gateway.dropped`` alert naming its id. So every id is delivered, held,
   or named in a drop record. Alarms and alerts are never evicted.
4. *A batch is signed once.* Its bytes and the new chain head are stored in the transaction
   that claims its events (or, for a direct batch, in the commit that accepts them), before
   the first send; a retry or a restart re-sends those bytes. Batch seqs are never reused in
   a lane and each batch names the hash of the one before it in its lane. An acknowledgement
   is written with the next transaction (at most `telemetry_window` later): one lost to a
   crash costs a re-send that the platform answers ``replay``.
5. *Alarms are never refused for quota*; when the quota is reached, telemetry and diagnostics
   are evicted or refused (RefusedError). On a full disk the reserve is released so that
   alarms and alerts still commit while the rest is refused.
6. *One thread touches the database*, and the figures kept in memory (`tally`) are what the
   tables say.
7. *Nothing raw escapes*: the store's failures reach callers as `OutboxError` (a StoreError,
   hence an OSError), refusals as RefusedError.

On disk (in the state dir)
--------------------------
``outbox.db`` (+ ``-wal``, ``-shm``), SQLite, ``user_version`` = `SCHEMA_VERSION` (5):

- ``meta(key, value)``, all text: ``next_id``, ``next_seq``, ``prev_hash`` (hex of the last
  batch's hash, the chain head), ``alarm_next_seq``, ``alarm_prev_hash`` (the alarm lane's
  chain head, since version 5), ``epoch``, ``last_acked_seq`` (the bulk lane's),
  ``last_acked_at`` (wall time or empty), ``dropped`` (JSON: events evicted per reason).
- ``events(id, prio, t, size, body, batch)``: ``body`` is the event's wire encoding (CBOR map,
  id included) built once at commit, ``size`` its length, ``batch`` the key of the batch
  holding it or NULL. Indexes: ``events_queue(prio, id) WHERE batch IS NULL`` (the claim
  order), ``events_batch(batch) WHERE batch IS NOT NULL`` (the ack's delete).
- ``batches(seq, hash, created, count, top_prio, data, held)``: ``seq`` the batch's key, its
  seq on the bulk lane and minus its seq on the alarm lane (`batches.batch_key`; an alarm
  lane batch is always direct), ``data`` the signed COSE_Sign1 bytes, ``hash`` their
  SHA-256; ``held`` (since version 4) NULL when the batch's events are rows, else JSON
  ``{"ids": [first, last], "prios": {prio: n}, "t": oldest}`` for a direct batch, whose events
  exist only in ``data``.
- ``refused(seq, epoch, hash, err, action, at, ids, data, lane)`` (since version 3; ``lane``
  since 5): batches the platform refused for good, kept for an operator.
- ``ingest_keys(key, t, ids)`` (since version 2): idempotency keys, ``ids`` = JSON
  ``[first id, count]``.

``outbox.db.reserve``: `reserve_bytes` of allocated space, released when the disk fills.
``chain.json``: ``id_floor``, ``acked_seq``, ``acked_hash`` (written atomically; survives the
store). ``outbox.db.corrupt-<UTC stamp>[.n]`` (+ ``-wal``, ``-shm``): a quarantined store.

Modules, one concern each
-------------------------
- `outbox`: `Outbox`, the face on the event loop, and `OutboxStats`;
- `writer`: the group-commit pipeline on the loop; `commit`: what one group's transaction
  holds (quota refusals, idempotent keys, a full disk);
- `store`: the open database on its thread, the one insert path (ids assigned there);
- `db`: connection settings, the one `transaction` helper, `OutboxError`;
- `schema`: schema and migrations, the writable check, quarantine of a corrupt store;
- `tally`: the figures kept in memory; `side`: ``chain.json``;
- `quota`: eviction with drop records; `diskfull`: the reserve and the full-disk mode;
  `storage`: the filesystem seam (a fake disk in tests);
- `keys`: idempotency keys; `batches`: claim, direct batches, ack, pending batches;
- `view`: the store read-only, for status and the demo (imports nothing heavy).

This package imports its modules when a name is first asked for, so that `agent.outbox.view`
(and `status`) does not pull in the signing code the rest needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.outbox.batches import DirectClaim, PendingBatch
    from agent.outbox.db import OutboxError
    from agent.outbox.outbox import Outbox, OutboxStats
    from agent.outbox.quota import id_ranges
    from agent.outbox.schema import SCHEMA_VERSION
    from agent.outbox.storage import OsStorage, Storage
    from agent.outbox.view import OutboxSnapshot, OutboxView

__all__ = [
    "SCHEMA_VERSION",
    "DirectClaim",
    "OsStorage",
    "Outbox",
    "OutboxError",
    "OutboxSnapshot",
    "OutboxStats",
    "OutboxView",
    "PendingBatch",
    "Storage",
    "id_ranges",
]

_WHERE = {
    "SCHEMA_VERSION": "schema",
    "DirectClaim": "batches",
    "OsStorage": "storage",
    "Outbox": "outbox",
    "OutboxError": "db",
    "OutboxSnapshot": "view",
    "OutboxStats": "outbox",
    "OutboxView": "view",
    "PendingBatch": "batches",
    "Storage": "storage",
    "id_ranges": "quota",
}


def __getattr__(name: str) -> Any:
    # The face imports agent.protocol (cbor2, cryptography): only when it is asked for.
    if name in _WHERE:
        return getattr(import_module(f"agent.outbox.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
