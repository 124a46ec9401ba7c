"""`branch-agent` as installers type it: subcommands, check-config, keygen, run on a bad config."""

from __future__ import annotations

import argparse
import json
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.core.errors import OperatorError
from agent.ops.cli import run_command
from tests.support.agentproc import to_toml

AGENT = [sys.executable, "-m", "agent.ops.cli"]
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=60,
                          check=False, stdin=subprocess.DEVNULL)


def test_help_lists_every_command() -> None:
    """`--help` names every command (run, check-config, keygen, provision, doctor, status,
    metrics, wipe, config, audit, and demo, which the simulator's distribution adds through the
    `branch_agent.commands` entry point: this environment has it installed)."""
    res = cli("--help")
    assert res.returncode == 0
    for cmd in ("run", "check-config", "keygen", "provision", "doctor", "status", "metrics",
                "demo", "wipe", "config", "audit"):
        assert cmd in res.stdout
    demo_help = cli("demo", "--help").stdout
    for opt in ("--duration SECONDS", "--headless", "--transport", "--workdir DIR", "--speed X"):
        assert opt in demo_help


def test_check_config_accepts_the_example() -> None:
    """config/example.toml passes check-config and the summary counts its serial devices."""
    res = cli("check-config", str(ROOT / "config" / "example.toml"))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout
    assert "serial: 3" in res.stdout


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    """An invalid config exits 2 and names each bad key on its own line."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(to_toml({"gateway": {"id": "gw", "stat_dir": "/x"},
                            "uplink": {"order": ["mqtt"]}}))
    res = cli("check-config", str(cfg))
    assert res.returncode == 2
    assert "gateway.stat_dir: unknown key; did you mean 'state_dir'?" in res.stderr
    assert "uplink" in res.stderr


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    """`run` with a missing config exits 2 with the reason instead of a traceback."""
    res = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr and "Traceback" not in res.stderr


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """keygen writes the private key with mode 0600 and refuses to replace it without --force."""
    first = cli("keygen", "--dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE((tmp_path / "signing.key").stat().st_mode) == 0o600
    key = (tmp_path / "signing.key").read_bytes()
    again = cli("keygen", "--dir", str(tmp_path))
    assert again.returncode == 1 and "--force" in again.stderr
    assert (tmp_path / "signing.key").read_bytes() == key
    forced = cli("keygen", "--dir", str(tmp_path), "--force")
    assert forced.returncode == 0
    assert (tmp_path / "signing.key").read_bytes() != key


BINDKEY = "231d39c1d7cc1ab1aee224cd096db932"


def test_config_show_prints_the_effective_config_redacted(tmp_path: Path) -> None:
    """`config show` prints the effective config (defaults filled in) as TOML that loads back to
    the same config, and as JSON with --json; a BTHome bindkey is redacted in both."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(to_toml({
        "gateway": {"id": "gw-show", "state_dir": str(tmp_path / "state")},
        "uplink": {"order": ["mqtt"], "mqtt": {"host": "127.0.0.1", "insecure": True}},
        "sources": {"ble": {"sensors": [{"name": "thermo", "address": "A4:C1:38:00:00:01",
                                         "decoder": "bthome", "bindkey": BINDKEY}]}},
    }))
    res = cli("config", "show", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert BINDKEY not in res.stdout and "**********" in res.stdout
    shown = tomllib.loads(res.stdout)
    assert shown["outbox"]["quota_bytes"] == 256 * 1024 * 1024  # a default, filled in
    sensor = shown["sources"]["ble"]["sensors"][0]
    sensor["bindkey"] = BINDKEY  # put the secret back: the rest is the same config
    assert parse_config(shown) == load_config(cfg)
    as_json = cli("config", "show", "--config", str(cfg), "--json")
    assert as_json.returncode == 0 and BINDKEY not in as_json.stdout
    assert json.loads(as_json.stdout)["gateway"]["id"] == "gw-show"


def test_operator_errors_are_one_line_and_programming_errors_keep_their_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    """What an operator can act on (AgentError, OSError) is printed alone with exit 1; a
    plain ValueError or KeyError from a bug is not swallowed into one line."""
    def refuse(_: argparse.Namespace) -> int:
        raise OperatorError("a certificate for another key")

    def missing(_: argparse.Namespace) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/etc/branch-agent/agent.toml")

    def bug(_: argparse.Namespace) -> int:
        raise ValueError("invalid literal for int() with base 10: 'x'")

    ns = argparse.Namespace()
    assert run_command(refuse, ns) == 1
    assert run_command(missing, ns) == 1
    err = capsys.readouterr().err
    assert "error: a certificate for another key" in err and "agent.toml" in err
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="invalid literal"):
        run_command(bug, ns)
