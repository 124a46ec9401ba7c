"""The audit trail: a bounded, append-only, hash-chained local log, and `audit.*` events.

Each security-relevant fact (configuration loaded or reloaded, operator command, refused
platform command, TLS or authentication failure, integrity failure, clock jump, tamper contact,
store reset) is written twice:

- as one JSON line in the local log (`audit.log`, mode 0640, in a 0750 directory: the service
  user writes, an admin group reads). Each record carries `prev`, the hash of the record before
  it, and `h`, the SHA-256 of its own canonical JSON, so editing, deleting or reordering any
  record breaks the chain (`branch-agent audit verify`). The log is bounded: past `max_bytes`
  it is rotated (`audit.log.1` ... `audit.log.{keep}`), and the chain continues across files;
- as an event of type `audit.*`, priority ALERT, in the outbox, so it also travels in a signed,
  hash-chained batch. The event names the local record (`n`, `h`), so the platform holds the
  chain head and a local truncation is detectable from the platform side too.

If the local log cannot be written (read-only, disk full), the event still goes to the outbox,
and one `audit.degraded` alert says so; alarms are not held up by the audit log, which is only
touched from a worker thread.

Several processes append (the agent, and `branch-agent provision/keygen/wipe` run by an
operator): each append takes an exclusive `flock` on the log and re-reads the chain head.
Operator commands have no outbox: their records become `audit.*` events when the agent next
starts (`AuditForwarder`), each once.

- `record`: a record, the digest that chains records, the actor;
- `verification`: reading every generation of the log, `verify` and `export`;
- `logfile`: `AuditLog`, the file: locked, fsync'd appends, rotation, locked reads;
- `trail`: `AuditTrail`, the runtime's side: the local record and the outbox event;
- `forwarder`: `AuditForwarder`, operator commands' records into the outbox, once each;
- `cli`: `branch-agent audit verify|export` (`python -m agent.security.audit`).

Light: the standard library, structlog and pydantic (the config model, agent.security.config);
operator commands that must start fast import it.
"""

from agent.security.audit.cli import DEFAULT_PATH, main
from agent.security.audit.forwarder import AGENT_ACTORS, AuditForwarder
from agent.security.audit.logfile import AuditLog, AuditWriteError
from agent.security.audit.record import ZERO, AuditRecord, config_digest, current_actor
from agent.security.audit.trail import AuditTrail
from agent.security.audit.verification import VerifyResult, export, verify

__all__ = [
    "AGENT_ACTORS",
    "DEFAULT_PATH",
    "ZERO",
    "AuditForwarder",
    "AuditLog",
    "AuditRecord",
    "AuditTrail",
    "AuditWriteError",
    "VerifyResult",
    "config_digest",
    "current_actor",
    "export",
    "main",
    "verify",
]
