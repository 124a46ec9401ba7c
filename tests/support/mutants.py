"""`make mutants`: each promise's test fails when the promise breaks.

For every entry of `MUTANTS`, a copy of the working tree (tracked and untracked, not ignored
files) gets one small change that breaks one promise, and the tests named for that promise
run against the copy (`PYTHONPATH` puts the copy before the editable install; the agents the
tests start inherit it). The mutant is *killed* when those tests fail; a mutant that survives
is a promise no test holds, and the command exits 1. First, the same tests run on the unchanged
copy and must pass, so that a kill is the mutation's doing and not a broken test.

    python -m tests.support.mutants            # all
    python -m tests.support.mutants wal-fsync  # by name
    python -m tests.support.mutants --list

The working tree is never modified. A mutation whose text is not found exactly once is an
error (the code moved: update the entry), never a silent pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "wal-fsync",
        "an append is accepted only after the WAL holding it was fsynced",
        "agent/outbox/db.py",
        'conn.execute("PRAGMA synchronous=FULL")',
        'conn.execute("PRAGMA synchronous=NORMAL")',
        ("tests/test_outbox.py::test_acceptance_follows_the_wal_fsync",),
    ),
    Mutant(
        "wal-fsync-power-cut",
        "nothing committed before a power cut is missing after it (simulated: unsynced writes "
        "dropped, not a process kill)",
        "agent/outbox/db.py",
        'conn.execute("PRAGMA synchronous=FULL")',
        'conn.execute("PRAGMA synchronous=OFF")',
        ("tests/faults/test_powercut.py::test_three_power_cuts_lose_nothing",),
    ),
    Mutant(
        "audit-log-name-durable",
        "the local audit log survives a power cut (its name fsynced before its first record)",
        "agent/security/audit/logfile.py",
        "        if created:\n            try:\n                fsync_dir(self.path.parent)",
        "        if False:\n            try:\n                fsync_dir(self.path.parent)",
        ("tests/faults/test_powercut.py::test_three_power_cuts_lose_nothing",),
    ),
    Mutant(
        "telemetry-window",
        "local telemetry shares one fsync'd transaction per window (SD card wear)",
        "agent/outbox/writer.py",
        "if first is not None or self.window <= 0:",
        "if True:",
        ("tests/test_window.py::test_telemetry_waits_for_its_window_and_commits_once",),
    ),
    Mutant(
        "telemetry-window-bound",
        "a power cut loses at most one telemetry window of telemetry",
        "agent/outbox/writer.py",
        "return max(self._queue[0].at + self.window, idle_since + self.commit_interval)",
        "return max(self._queue[0].at + self.window + 60, idle_since + self.commit_interval)",
        ("tests/faults/test_powercut.py::test_telemetry_lost_at_a_cut_stays_within_its_window",),
    ),
    Mutant(
        "window-alarms-at-once",
        "alarms, alerts and CoAP readings never wait for the telemetry window",
        "agent/outbox/writer.py",
        "immediate = key is not None or any(e.prio <= ALERT for e in events)",
        "immediate = key is not None and any(e.prio <= ALERT for e in events)",
        ("tests/test_window.py::test_alarms_alerts_and_keyed_appends_do_not_wait",),
    ),
    Mutant(
        "window-no-hand-over",
        "a driver's poll loop is not held up by the telemetry window",
        "agent/runtime/sink.py",
        "        if (key is None and self.outbox.telemetry_window > 0",
        "        if (False and key is None and self.outbox.telemetry_window > 0",
        ("tests/test_window.py::test_a_driver_is_not_held_up_by_the_window",),
    ),
    Mutant(
        "store-reset-time-quality",
        "the outbox's own alerts carry the clock's time quality (CR 2.11)",
        "agent/outbox/outbox.py",
        "                tq=self._tq(),",
        "                tq=TQ_SYNCED,",
        ("tests/test_outbox.py::test_store_reset_alert_carries_the_clocks_time_quality",),
    ),
    Mutant(
        "wire-duplicate",
        "every event id crosses the wire once (the platform store would hide a repeat)",
        "agent/outbox/batches.py",
        "(seq, json.dumps([c[0] for c in chosen])))",
        "(seq, json.dumps([c[0] for c in (chosen[:-1] if len(chosen) > 1 else chosen)])))",
        ("tests/test_e2e_mqtt.py::test_every_event_arrives_exactly_once",),
    ),
    Mutant(
        "quota-order",
        "past the quota, diagnostics go before telemetry; alarms and alerts never",
        "agent/outbox/quota.py",
        "for prio in range(3, floor_prio - 1, -1):",
        "for prio in range(floor_prio, 4):",
        ("tests/test_outbox.py::test_quota_evicts_low_priority_oldest_first_and_records_every_id",),
    ),
    Mutant(
        "disk-full-reserve",
        "a full disk releases the reserve so that alarms still commit",
        "agent/outbox/diskfull.py",
        "        self.storage.release(self.reserve_path)\n        store.restart_wal()",
        "        store.restart_wal()",
        ("tests/test_outbox.py::test_full_disk_releases_the_reserve_and_keeps_alarms",),
    ),
    Mutant(
        "disk-full-alert",
        "a full disk is reported by a gateway.disk_full alert",
        "agent/outbox/diskfull.py",
        'type="gateway.disk_full"',
        'type="gateway.disk_low"',
        ("tests/test_outbox.py::test_full_disk_releases_the_reserve_and_keeps_alarms",),
    ),
    Mutant(
        "small-file-dir-fsync",
        "small state files survive a power cut whole (the rename is made durable)",
        "agent/core/atomic.py",
        "    if durable:\n        fsync_dir(path.parent)\n    return True",
        "    return True",
        ("tests/test_atomic.py",),
    ),
    Mutant(
        "cbor-plain",
        "the platform accepts batches whatever cbor2 a gateway resolves (arrays as lists)",
        "agent/core/cbor.py",
        "value = plain(cbor2.CBORDecoder(fp).decode())",
        "value = cbor2.CBORDecoder(fp).decode()",
        ("tests/test_cbor.py",),
    ),
    Mutant(
        "new-store-new-epoch",
        "a store made anew (empty state dir, quarantine) starts a chain the platform accepts",
        "agent/outbox/schema.py",
        '("epoch", new_epoch()),',
        '("epoch", ""),',
        ("tests/test_rejoin.py::test_a_gateway_restored_onto_an_empty_state_dir_rejoins",),
    ),
    Mutant(
        "quarantine-new-epoch",
        "after a crash and a quarantined store, delivery goes on (no fork)",
        "agent/outbox/schema.py",
        '("epoch", new_epoch()),',
        '("epoch", ""),',
        ("tests/test_rejoin.py::test_a_quarantine_after_a_crash_keeps_delivering",),
    ),
    Mutant(
        "refusal-hold-backoff",
        "a batch refused for its key is held, sent again only after a growing wait",
        "agent/runtime/forwarder.py",
        "wait = min(self.ack_timeout_s * 2 ** self._hold_level, MAX_HOLD_S)",
        "wait = 0.0",
        ("tests/test_forwarder.py::test_a_refused_key_is_held_with_backoff_and_raised_once",),
    ),
    Mutant(
        "refusal-fork-rechains",
        "a fork restarts the chain in a new epoch with every unacknowledged event",
        "agent/runtime/forwarder.py",
        'RECHAIN_REASONS = frozenset({"fork"})',
        "RECHAIN_REASONS: frozenset[str] = frozenset()",
        ("tests/test_forwarder.py::test_a_fork_restarts_the_chain_in_a_new_epoch",),
    ),
    Mutant(
        "refusal-bounded",
        "a batch the platform can never accept does not block the ones behind it",
        "agent/runtime/forwarder.py",
        "if n >= MAX_REFUSALS:",
        "if n >= MAX_REFUSALS * 1000:",
        ("tests/test_forwarder.py::test_a_malformed_batch_is_parked_and_the_rest_goes_on",),
    ),
    Mutant(
        "platform-epoch-replaced",
        "the platform refuses to extend a chain that a new epoch replaced",
        "hardware-sim/branchsim/platform/rules.py",
        '            _replay_or(batch, state, "fork", f"epoch {batch.epoch.hex()} was replaced")',
        "            pass",
        ("tests/test_platform.py::test_a_gateway_that_lost_its_state_rejoins_in_a_new_epoch",),
    ),
    Mutant(
        "zstd-size-checked-first",
        "a compressed batch's declared size is checked before anything is decompressed",
        "agent/protocol/batches.py",
        "if size < 0 or size > MAX_PAYLOAD:",
        "if size < 0:",
        ("tests/test_protocol.py::test_compressed_payload_is_checked_before_it_is_expanded",),
    ),
    Mutant(
        "zstd-on-the-wire",
        "with compression on, a branch's telemetry takes at most 25 bytes per event on the wire",
        "agent/runtime/forwarder.py",
        "            compress=self.compress,\n",
        "",
        ("tests/test_e2e_mqtt.py::"
         "test_compressed_batches_arrive_exactly_once_in_a_fraction_of_the_bytes",),
    ),
    Mutant(
        "tls-hostname",
        "the MQTT uplink verifies the broker's host name",
        "agent/uplink/mqtt.py",
        "ctx.check_hostname = True",
        "ctx.check_hostname = False",
        ("tests/test_tls.py::test_broker_certificate_for_another_host_refused",),
    ),
    Mutant(
        "tls-1.1",
        "the MQTT uplink never agrees on TLS below 1.2",
        "agent/uplink/mqtt.py",
        "ctx.minimum_version = ssl.TLSVersion.TLSv1_2",
        'ctx.minimum_version = ssl.TLSVersion.TLSv1_1; ctx.set_ciphers("DEFAULT:@SECLEVEL=0")',
        ("tests/test_tls.py::test_tls_1_1_server_refused",),
    ),
    Mutant(
        "coap-flood-gate",
        "a CoAP flood does not delay alarms (datagrams over the endpoint's rate are dropped "
        "before aiocoap parses them)",
        "drivers/coap/server.py",
        "if self.admit is not None and not self.admit():",
        "if False:",
        ("tests/test_flood.py::test_coap_flood_does_not_delay_alarms",),
    ),
    Mutant(
        "coap-answer-before-commit",
        "a CoAP sensor gets 2.04 only after its readings are committed",
        "drivers/coap/server.py",
        "await self._sink.submit_many(readings, key=_request_key(sensor, request))",
        "asyncio.ensure_future(self._sink.submit_many(readings, "
        "key=_request_key(sensor, request)))",
        ("tests/test_coap_ingest.py::test_requests_waiting_for_the_outbox_are_bounded",),
    ),
    Mutant(
        "coap-idempotency-key",
        "a CoAP retransmission reaching a restarted agent is not stored twice",
        "drivers/coap/server.py",
        "await self._sink.submit_many(readings, key=_request_key(sensor, request))",
        "await self._sink.submit_many(readings)",
        ("tests/test_coap_e2e.py::test_retransmission_after_a_restart_is_stored_once",),
    ),
    Mutant(
        "direct-batch-order",
        "a batch signed at commit never jumps ahead of older unclaimed events",
        "agent/outbox/batches.py",
        "alarms_only = all(e.prio == ALARM for e in events)",
        "alarms_only = True",
        ("tests/test_direct_batches.py::test_direct_batches_keep_the_claim_order",),
    ),
    Mutant(
        "zstd-trailing-bytes",
        "a compressed payload is one zstd frame and nothing after it",
        "agent/protocol/batches.py",
        "decompress(payload, allow_extra_data=False)",
        "decompress(payload, allow_extra_data=True)",
        ("tests/test_protocol.py::test_compressed_payload_is_checked_before_it_is_expanded",),
    ),
    Mutant(
        "direct-alarm-order",
        "an alarm signed at commit never passes an older unclaimed alarm",
        "agent/outbox/batches.py",
        "not (alarms_only and not store.tally.unclaimed_alarms)",
        "not alarms_only",
        ("tests/test_direct_batches.py::test_an_alarm_passes_a_backlog_in_its_own_commit",),
    ),
    Mutant(
        "direct-batch-dissolved",
        "a new chain gives a direct batch's events back as rows",
        "agent/outbox/batches.py",
        "        if not (park and int(seq) == key)",
        "        if not (park or int(seq) == key)",
        ("tests/test_direct_batches.py::test_a_new_chain_turns_direct_batches_back_into_rows",),
    ),
    Mutant(
        "deferred-ack-written",
        "an acknowledged batch is deleted with the store's next write",
        "agent/outbox/batches.py",
        "    store.acked.append(key)\n",
        "",
        ("tests/test_direct_batches.py::test_an_ack_is_written_with_the_next_transaction",),
    ),
    Mutant(
        "alarm-lane-own-chain",
        "the alarm lane is a hash chain of its own (its own seq and prev)",
        "agent/outbox/batches.py",
        'ALARM_LANE: ("alarm_next_seq", "alarm_prev_hash")}',
        'ALARM_LANE: ("next_seq", "prev_hash")}',
        ("tests/test_alarm_lane.py::test_alarms_get_a_chain_of_their_own",),
    ),
    Mutant(
        "alarm-lane-alarms-only",
        "only a group of alarms goes on the alarm lane",
        "agent/outbox/batches.py",
        "if not alarms_only or store.tally.unclaimed_alarms:",
        "if store.tally.unclaimed_alarms:",
        ("tests/test_alarm_lane.py::test_alarms_get_a_chain_of_their_own",),
    ),
    Mutant(
        "alarm-lane-order",
        "an alarm on the alarm lane never passes an older alarm waiting unclaimed",
        "agent/outbox/batches.py",
        "if not alarms_only or store.tally.unclaimed_alarms:",
        "if not alarms_only:",
        ("tests/test_alarm_lane.py::test_an_older_unclaimed_alarm_keeps_the_lane_in_order",),
    ),
    Mutant(
        "alarm-lane-ack-key",
        "an ack names one lane's batch: the other lane's batch of the same seq stays",
        "agent/outbox/batches.py",
        "    key = batch_key(lane, seq)\n    if key in store.acked:",
        "    key = seq\n    if key in store.acked:",
        ("tests/test_alarm_lane.py::test_an_ack_names_one_lane",),
    ),
    Mutant(
        "restart-waits-for-other-lane",
        "a new chain waits until every batch of the other lane has been refused too",
        "agent/outbox/batches.py",
        "            or not other <= refused_too):",
        "            ):",
        ("tests/test_alarm_lane.py::test_a_restart_waits_for_the_other_lane_then_starts_both",),
    ),
    Mutant(
        "alarm-lane-holds-alarms-only",
        "a platform refuses an alarm lane batch that holds anything but alarms",
        "agent/protocol/batches.py",
        'if lane == ALARM_LANE and any(ev["prio"] != 0 for ev in checked):',
        'if lane == ALARM_LANE and all(ev["prio"] != 0 for ev in checked) and False:',
        ("tests/test_vectors.py::test_batches_with_our_code",),
    ),
    Mutant(
        "alarm-commit-first",
        "an alarm's commit runs before the claims and acks waiting for the database thread",
        "agent/outbox/db.py",
        "return self._put(self._FIRST, fn, args, {})",
        "return self._put(self._NEXT, fn, args, {})",
        ("tests/test_outbox.py::test_an_alarms_commit_runs_before_the_jobs_waiting_for_the_database",),
    ),
    Mutant(
        "provision-packaged-unit",
        "provision never hides the Debian package's unit behind a copy in /etc",
        "agent/ops/provision/image.py",
        "    packaged = packaged_unit(root)\n",
        "    packaged = None\n",
        ("tests/test_provision.py::"
         "test_provision_on_a_packaged_install_leaves_the_units_to_the_package",),
    ),
    Mutant(
        "alarm-lane-topic",
        "alarm lane batches go on their own MQTT topic",
        "agent/uplink/mqtt.py",
        'self.topics["alarm" if lane else "batch"]',
        'self.topics["batch"]',
        ("tests/test_alarm_lane.py::test_an_alarm_passes_a_backlog_on_its_own_lane",),
    ),
    Mutant(
        "alarm-topic-fallback",
        "a platform that does not read the alarm topic still gets the alarms",
        "agent/runtime/forwarder.py",
        "            self._alarm_topic = False\n",
        "",
        ("tests/test_alarm_lane.py::test_a_platform_without_lanes_gets_its_alarms_on_the_bulk_lane",),
    ),
    Mutant(
        "alarm-lane-refused-rechained",
        "alarm lane batches a platform refuses as malformed go again on the bulk lane",
        "agent/runtime/forwarder.py",
        "            rechain = True\n",
        "            pass\n",
        ("tests/test_alarm_lane.py::test_a_platform_without_lanes_gets_its_alarms_on_the_bulk_lane",),
    ),
    Mutant(
        "platform-lane-head",
        "the platform checks each lane against its own chain head",
        "hardware-sim/branchsim/platform/receiver.py",
        "head=self._ends(batch.gw, current).get(batch.lane, (0, ZERO_HASH))",
        "head=self._ends(batch.gw, current).get(BULK_LANE, (0, ZERO_HASH))",
        ("tests/test_platform_lanes.py::test_alarm_lane_starts_at_seq_1_beside_a_bulk_lane_at_seq_5",
         "tests/test_platform_lanes.py::test_gap_fork_replay_are_per_lane"),
    ),
    Mutant(
        "bus-answer-after-commit",
        "a fleet receiver answers a gateway only after the batch is committed",
        "hardware-sim/branchsim/platform/bus.py",
        "            ack = await asyncio.to_thread(store.handle_batch, msg.data, topic_gw)",
        "            proto = __import__('agent.protocol').protocol; "
        "ack = proto.Ack(seq=0, h=proto.batch_hash(msg.data), ok=True); "
        "asyncio.get_running_loop().run_in_executor(None, store.handle_batch, msg.data, "
        "topic_gw)",
        ("tests/test_fleet.py::test_fleet_survives_a_node_and_a_receiver_killed",),
    ),
    Mutant(
        "mqtt-subscribe-refused-reconnects",
        "a gateway whose ack subscription is refused connects again",
        "agent/uplink/mqtt.py",
        """                             f"{self.topics['ack']} or {self.topics['cmd']} topic")
        client.disconnect()""",
        """                             f"{self.topics['ack']} or {self.topics['cmd']} topic")""",
        ("tests/test_mqtt_uplink.py::test_a_refused_ack_subscription_is_counted_and_connected_again",),
    ),
    Mutant(
        "pg-duplicate-refused",
        "the PostgreSQL store refuses a batch that holds an event already stored",
        "hardware-sim/branchsim/platform/pgstore.py",
        '            raise ProtocolError("malformed", str(exc)) from exc',
        "            return",
        ("tests/test_pgstore.py::test_a_duplicate_event_fails_loudly_and_stores_nothing_of_its_batch",),
    ),
    Mutant(
        "platform-alarm-first",
        "at the platform a waiting alarm lane batch goes before waiting bulk batches",
        "hardware-sim/branchsim/platform/handling.py",
        "lane == ALARM_LANE or not self._waiting[ALARM_LANE]))",
        "True))",
        ("tests/test_platform_lanes.py::test_a_waiting_alarm_goes_before_waiting_bulk_batches",),
    ),
    Mutant(
        "arming-unsynced-never-disarms",
        "an unsynchronised clock never disarms the branch (the schedule may still arm it)",
        "agent/rules/arming.py",
        "if not sched_armed and not synced:",
        "if False:",
        ("tests/test_arming.py::test_unsynchronised_clock_never_disarms_but_arms",),
    ),
    Mutant(
        "held-open-waits",
        "a contact held open raises its alert at the configured time, not later",
        "agent/rules/stateful.py",
        "if src not in self._raised and now - since >= self.after_s:",
        "if src not in self._raised and now - since >= 2 * self.after_s:",
        ("tests/test_stateful_rules.py::test_held_open_raises_after_the_wait_and_closing_clears",),
    ),
    Mutant(
        "silence-raises",
        "a source silent for after_s raises sensor.silent",
        "agent/rules/stateful.py",
        "if src not in self._silent and now - last >= self.after_s:",
        "if False:",
        ("tests/test_stateful_rules.py::test_silence_raises_once_and_hearing_clears",
         "tests/test_branch_rules_e2e.py"),
    ),
    Mutant(
        "heartbeat-path-signed",
        "a heartbeat signed for one path and played on the other is refused",
        "hardware-sim/branchsim/platform/supervision.py",
        "if hb.path != via:",
        "if False:",
        ("tests/test_supervision.py::"
         "test_forged_replayed_and_misrouted_heartbeats_are_refused_and_counted",),
    ),
    Mutant(
        "alarm-other-path",
        "an alarm goes over the other path at once when heartbeats stop being answered",
        "agent/runtime/forwarder.py",
        "return next((u for u in self.uplinks if u is not act and self._sound(u)), None)",
        "return act",
        ("tests/test_supervision.py::test_an_alarm_during_the_cut_goes_over_the_other_path_at_once",),
    ),
    Mutant(
        "nut-on-battery-alert",
        "a UPS on battery (NUT status OB) is an alert",
        "drivers/nut/source.py",
        '"OB": ("ups.on_battery", ALERT),',
        '"OB": ("ups.on_battery", TELEMETRY),',
        ("tests/test_nut.py::test_readings_units_and_status_alerts_once",
         "tests/test_ip_devices.py::test_the_runtime_runs_each_ip_source_from_the_config"),
    ),
    Mutant(
        "ip-sources-run",
        "the NUT sources in the config are run by the agent",
        "agent/runtime/root.py",
        "sources.extend(nut.build_sources(cfg.sources.nut, ctx))",
        "pass",
        ("tests/test_ip_devices.py::test_the_runtime_runs_each_ip_source_from_the_config",),
    ),
    Mutant(
        "ip-scenario-steps",
        "a scenario's steps reach its IP devices (NUT, SNMP, Modbus TCP)",
        "hardware-sim/branchsim/sim.py",
        "self._ip[timed.device].sim.apply(_ip_payload(timed.step))",
        "pass",
        ("tests/test_ip_scenarios.py::test_facility_over_ip_reaches_the_outbox",),
    ),
    Mutant(
        "ip-scenario-daemons-stopped",
        "the simulator stops every daemon it started, also after a start failing half-way",
        "hardware-sim/branchsim/sim.py",
        "                ip.sim.stop()\n",
        "                pass\n",
        ("tests/test_ip_scenarios.py::test_start_failing_half_way_stops_every_daemon_started",),
    ),
    Mutant(
        "platform-ack-before-sync",
        "the reference platform answers a batch only once it is durable (its batch commits do "
        "not fsync; the WAL is synced before the answer)",
        "hardware-sim/branchsim/platform/receiver.py",
        "            os.fdatasync(fd)\n",
        "            pass\n",
        ("tests/test_platform_durable.py::test_every_acknowledged_batch_survives_a_power_cut",),
    ),
    Mutant(
        "platform-never-checkpoints",
        "the reference platform checkpoints its WAL itself, so the WAL stays bounded",
        "hardware-sim/branchsim/platform/receiver.py",
        "if wal_bytes >= limit and self._checkpointing.acquire(blocking=False):",
        "if False:",
        ("tests/test_platform_durable.py::"
         "test_the_wal_is_checkpointed_outside_the_lock_and_stays_bounded",),
    ),
    Mutant(
        "platform-bulk-never-stands-aside",
        "the reference platform's bulk handlers stand aside while an alarm is handled",
        "hardware-sim/branchsim/platform/handling.py",
        "self._cond.wait_for(lambda: not self._active, timeout=self.yield_max_s)",
        "pass",
        ("tests/test_platform_lanes.py::"
         "test_bulk_handlers_stand_aside_while_an_alarm_is_handled",),
    ),
    Mutant(
        "platform-urgent-bulk-keeps-precedence",
        "a batch that came on the alarm topic keeps precedence only if its payload says alarm",
        "hardware-sim/branchsim/platform/handling.py",
        "            else:\n                turn.stop()\n",
        "",
        ("tests/test_platform_lanes.py::"
         "test_bulk_handlers_stand_aside_while_an_alarm_is_handled",),
    ),
)

def tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def copy_tree(dst: Path) -> None:
    for rel in tree_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def pytest(copy: Path, tests: tuple[str, ...], log: Path) -> int:
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(copy), str(copy / "hardware-sim")]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    with log.open("wb") as out:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
        ).returncode


def apply(copy: Path, m: Mutant) -> str:
    path = copy / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"{m.name}: {m.old!r} is in {m.path} {text.count(m.old)} times, "
                         "not once: the code moved, update tests/support/mutants.py")
    path.write_text(text.replace(m.old, m.new))
    return text


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mutants", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:28} {m.path}: {m.promise}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        ap.error(f"no mutant named {', '.join(unknown)}; known: {', '.join(by_name)}")
    chosen = [by_name[n] for n in args.names] if args.names else list(MUTANTS)
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy, logs = Path(tmp) / "tree", Path(tmp) / "logs"
        logs.mkdir()
        copy_tree(copy)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        t0 = time.monotonic()
        if pytest(copy, tests, logs / "baseline.log") != 0:
            print(f"the tests fail without any mutation:\n{tail(logs / 'baseline.log')}")
            return 2
        print(f"baseline: {len(tests)} test selections pass unmutated "
              f"({time.monotonic() - t0:.0f} s)")
        survived = []
        for m in chosen:
            original = apply(copy, m)
            t0 = time.monotonic()
            try:
                rc = pytest(copy, m.tests, logs / f"{m.name}.log")
            finally:
                (copy / m.path).write_text(original)
            took = time.monotonic() - t0
            verdict = {0: "SURVIVED", 1: "killed"}.get(rc, f"error (pytest exit {rc})")
            print(f"{m.name:28} {verdict:10} {took:5.0f} s  {m.promise}")
            if rc != 1:
                survived.append(m.name)
                print(tail(logs / f"{m.name}.log"))
    if survived:
        print(f"{len(survived)} of {len(chosen)} mutants not killed: {', '.join(survived)}")
        return 1
    print(f"all {len(chosen)} mutants killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
