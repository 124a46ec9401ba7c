"""Configuration: the example validates; every problem is named by its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "agent.ops.cli"]

MINIMAL = {
    "gateway": {"id": "gw-1"},
    "uplink": {"order": ["mqtt"], "mqtt": {"host": "h", "insecure": True}},
}


def test_example_config_passes_check_config() -> None:
    """`branch-agent check-config config/example.toml` exits 0 and prints a summary."""
    r = subprocess.run([*CLI, "check-config", str(ROOT / "config/example.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "branch-0042" in r.stdout


def test_wrong_type_unknown_key_and_missing_key_all_named(tmp_path: Path) -> None:
    """A file with a wrong type, an unknown key and a missing required key exits 2 and names
    all three key paths, with a did-you-mean for the unknown key."""
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nstate_dir = "/tmp/x"\n'          # gateway.id missing
        '[outbox]\nquota_bytes = "lots"\n'           # wrong type
        '[forwarder]\nbatch_max_event = 10\n'        # unknown key (typo)
        '[uplink]\norder = ["mqtt"]\n[uplink.mqtt]\nhost = "h"\ninsecure = true\n'
    )
    r = subprocess.run([*CLI, "check-config", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    err = r.stderr
    assert "gateway.id: missing" in err
    assert "outbox.quota_bytes: got 'lots', expected" in err
    assert "forwarder.batch_max_event: unknown key; did you mean 'batch_max_events'?" in err


def test_problems_in_nested_driver_tables_name_their_path() -> None:
    """Errors inside arrays of tables carry the index in the path."""
    doc = {**MINIMAL, "sources": {"serial": {"ups": [{"name": "u", "port": "/dev/x",
                                                      "baudrate": "fast"}]}}}
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert any(p.startswith("sources.serial.ups[0].baudrate: got 'fast'")
               for p in info.value.problems), info.value.problems


def test_uplink_listed_without_its_table_is_an_error() -> None:
    """uplink.order naming coap without [uplink.coap] is reported, not discovered at run time."""
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"id": "g"}, "uplink": {"order": ["coap"]}})
    assert any("uplink.coap" in p for p in info.value.problems)


def test_mqtt_without_tls_needs_insecure() -> None:
    """Plain MQTT is refused unless the config says insecure = true."""
    with pytest.raises(ConfigError) as info:
        parse_config({"gateway": {"id": "g"},
                      "uplink": {"order": ["mqtt"], "mqtt": {"host": "h"}}})
    assert any(p.startswith("uplink.mqtt") for p in info.value.problems)


def test_not_toml_and_missing_file_are_clear(tmp_path: Path) -> None:
    """A file that is not TOML, or not there, gives a ConfigError naming the file."""
    f = tmp_path / "x.toml"
    f.write_text("[gateway\nid=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_invalid_gateway_id_and_time_sync_rejected() -> None:
    """Gateway ids are restricted to a safe alphabet; time_sync has a fixed vocabulary."""
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "gateway": {"id": "bad id/..", "time_sync": "ntp"}})
    probs = "\n".join(info.value.problems)
    assert "gateway.id: got 'bad id/..'" in probs
    assert "gateway.time_sync: got 'ntp', expected auto, synced, unsynced or file:PATH" in probs
