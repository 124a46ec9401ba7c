"""A simulated NUT server: Debian's real upsd and dummy-ups driver on 127.0.0.1:<free port>,
serving one UPS whose state a test or a scenario changes while both run.

Real daemons, not a Python imitation: the NUT source then meets upsd's own answers (its quoting,
``ERR DATA-STALE`` when the driver stops answering, ``ERR DRIVER-NOT-CONNECTED`` when it is gone,
``ACCESS-DENIED`` at LOGIN).

Everything lives in `dir`: ups.conf, upsd.conf, upsd.users, the UPS's ``<ups>.dev`` file (upsc
format, ``var: value``), the driver's socket, the logs. ``NUT_CONFPATH`` and ``NUT_STATEPATH``
point both daemons there, so nothing of /etc/nut or /run/nut is used.

How a state change reaches upsd: ``*.dev`` files put dummy-ups in its "dummy-once" mode (NUT
2.8): it parses the file once, then at each poll (``pollinterval = 1``, plus the driver's own
1 s pause) re-parses it when the file's mtime has changed. The driver compares whole seconds
(``st_mtime``), so `set` writes the new file beside the old one, gives it an mtime one second past
the previous one and renames it over: the driver never reads half a file and never misses two
changes within one second.

As root the daemons would drop privileges to the ``nut`` user and then could not use `dir`:
they are started with ``-u root`` instead (a test sandbox; a real NUT server runs as ``nut``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from branchsim.broker import get_free_port, wait_port
from branchsim.procs import terminate

__all__ = ["DEFAULT_STATE", "DUMMY_UPS", "UPSD", "NutServer", "find_nut"]

UPSD = "/lib/nut/upsd"  # Debian's /usr/sbin/upsd is a wrapper that refuses unless nut.conf says
DUMMY_UPS = "/lib/nut/dummy-ups"  # MODE=standalone; the binaries are here

# A healthy UPS on mains, as a NUT driver reports one (upsc names).
DEFAULT_STATE: dict[str, str] = {
    "device.mfr": "BRANCHSIM",
    "device.model": "SIM-UPS 1500",
    "ups.status": "OL CHRG",
    "battery.charge": "100",
    "battery.runtime": "1800",
    "battery.voltage": "27.2",
    "ups.load": "23",
    "ups.temperature": "29.5",
    "input.voltage": "230.1",
    "input.frequency": "50.0",
    "output.voltage": "230.0",
}


def find_nut() -> tuple[str, str] | None:
    """(upsd, dummy-ups) when Debian's nut-server is installed."""
    if os.access(UPSD, os.X_OK) and os.access(DUMMY_UPS, os.X_OK):
        return UPSD, DUMMY_UPS
    return None


class NutServer:
    """upsd + dummy-ups serving UPS `ups` on 127.0.0.1:`port`. `users`: name -> password of
    ``upsmon secondary`` users in upsd.users (what the NUT source's LOGIN needs). `maxage_s`:
    upsd's MAXAGE, seconds without word from the driver before its data is stale."""

    def __init__(self, dir: Path, ups: str = "sim", port: int | None = None,
                 state: Mapping[str, str] | None = None, users: Mapping[str, str] | None = None,
                 maxage_s: int = 15) -> None:
        if find_nut() is None:
            raise RuntimeError(f"NUT not found ({UPSD}, {DUMMY_UPS}): apt install nut-server")
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ups = ups
        self.port = port or get_free_port()
        self.state: dict[str, str] = dict(DEFAULT_STATE if state is None else state)
        self.dev = self.dir / f"{ups}.dev"
        self.upsd: subprocess.Popen[bytes] | None = None
        self.driver: subprocess.Popen[bytes] | None = None
        self._mtime_s = int(time.time())
        self._env = {**os.environ, "NUT_CONFPATH": str(self.dir), "NUT_STATEPATH": str(self.dir)}
        self._user = ["-u", "root"] if os.getuid() == 0 else []
        users = users or {}
        self._write("ups.conf", f"[{ups}]\n  driver = dummy-ups\n  port = {self.dev}\n"
                    "  pollinterval = 1\n  desc = \"branchsim UPS\"\n")
        self._write("upsd.conf", f"LISTEN 127.0.0.1 {self.port}\nMAXAGE {maxage_s}\n")
        self._write("upsd.users", "".join(
            f"[{name}]\n  password = {_quoted(password)}\n  upsmon secondary\n"
            for name, password in users.items()))
        self._write_dev()

    def _write(self, name: str, text: str) -> None:
        path = self.dir / name
        path.write_text(text)
        path.chmod(0o600)  # upsd warns about world-readable configs (upsd.users holds passwords)

    def _write_dev(self) -> None:
        """The state as the .dev file, replaced atomically with an mtime one second later than
        the last (see the module doc)."""
        self._mtime_s = max(self._mtime_s + 1, int(time.time()))
        tmp = self.dev.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in self.state.items()))
        os.utime(tmp, (self._mtime_s, self._mtime_s))
        tmp.replace(self.dev)

    # --- the UPS ---------------------------------------------------------------------------

    def set(self, values: Mapping[str, str]) -> None:
        """Change the UPS: e.g. ``{"ups.status": "OB DISCHRG", "input.voltage": "0"}``. upsd
        serves the new values within about two seconds (`wait_for` waits for them)."""
        self.state.update(values)
        self._write_dev()

    def apply(self, step: Mapping[str, Any]) -> None:
        """A scenario step: ``set`` (variables, as `set`), then ``driver`` = stop | start |
        freeze | thaw, then ``upsd`` = stop | start. Starting what runs, or stopping what is
        stopped, does nothing."""
        if "set" in step:
            self.set({k: str(v) for k, v in dict(step["set"]).items()})
        match step.get("driver"):
            case "stop":
                self.stop_driver()
            case "start" if not _running(self.driver):
                self.start_driver()
            case "freeze" if _running(self.driver):
                self.freeze_driver()
            case "thaw" if _running(self.driver):
                self.thaw_driver()
        match step.get("upsd"):
            case "stop":
                self.stop_upsd()
            case "start" if not _running(self.upsd):
                self.start_upsd()

    def query(self, command: str, timeout: float = 2.0) -> list[str]:
        """One protocol command, its reply lines (a whole list for LIST commands)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            f = s.makefile("rwb")
            f.write(command.encode() + b"\n")
            f.flush()
            lines = [f.readline().decode().rstrip("\n")]
            if lines[0].startswith("BEGIN"):
                while not lines[-1].startswith("END"):
                    lines.append(f.readline().decode().rstrip("\n"))
            return lines

    def value(self, var: str) -> str | None:
        """What upsd serves now for `var` (None: an error, e.g. the driver is away)."""
        try:
            reply = self.query(f"GET VAR {self.ups} {var}")[0]
        except OSError:
            return None
        prefix = f"VAR {self.ups} {var} "
        return reply[len(prefix):].strip('"') if reply.startswith(prefix) else None

    def wait_for(self, var: str, expected: str | None, timeout: float = 10.0) -> None:
        """Until upsd serves `expected` for `var` (None: until it serves nothing for it)."""
        deadline = time.monotonic() + timeout
        while (got := self.value(var)) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"upsd serves {var}={got!r}, not {expected!r}, after "
                                   f"{timeout} s:\n{self._logs()}")
            time.sleep(0.05)  # polling interval of a condition wait, not a fixed delay

    # --- processes -------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> NutServer:
        """Start the driver, then upsd, and wait until upsd serves the UPS's status."""
        self.start_driver()
        self.start_upsd(timeout)
        self.wait_for("ups.status", self.state.get("ups.status"), timeout)
        return self

    def _popen(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.dir / log).open("ab") as out:
            # a session of its own: a Ctrl-C meant for the test run does not reach it
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self._env, cwd=self.dir,
                                    start_new_session=True)

    def start_driver(self, timeout: float = 10.0) -> None:
        assert not _running(self.driver), "driver already running"
        sock = self.dir / f"dummy-ups-{self.ups}"
        sock.unlink(missing_ok=True)
        self.driver = self._popen([DUMMY_UPS, "-a", self.ups, "-F", *self._user], "driver.log")
        deadline = time.monotonic() + timeout
        while not sock.exists():  # the driver is up once its socket for upsd is there
            if self.driver.poll() is not None:
                raise RuntimeError(f"dummy-ups exited with {self.driver.returncode}:\n"
                                   f"{self._logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dummy-ups made no socket in {timeout} s:\n{self._logs()}")
            time.sleep(0.02)  # polling interval of a condition wait

    def start_upsd(self, timeout: float = 10.0) -> None:
        assert not _running(self.upsd), "upsd already running"
        self.upsd = self._popen([UPSD, "-F", *self._user], "upsd.log")
        try:
            wait_port(self.port, timeout, proc=self.upsd, log=self.dir / "upsd.log", name="upsd")
        except BaseException:
            terminate(self.upsd)
            raise

    def stop_upsd(self) -> None:
        terminate(self.upsd)

    def stop_driver(self) -> None:
        if _running(self.driver):
            assert self.driver is not None
            os.kill(self.driver.pid, signal.SIGCONT)  # a frozen driver would not act on SIGTERM
        terminate(self.driver)

    def freeze_driver(self) -> None:
        """SIGSTOP the driver: it holds its socket but answers nothing, so after MAXAGE upsd
        calls its data stale (a driver that lost its UPS); `thaw_driver` resumes it."""
        assert self.driver is not None and _running(self.driver)
        os.kill(self.driver.pid, signal.SIGSTOP)

    def thaw_driver(self) -> None:
        assert self.driver is not None
        os.kill(self.driver.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop upsd and the driver (also a frozen one). Idempotent."""
        terminate(self.upsd)
        self.stop_driver()

    def agent_config(self, **overrides: Any) -> dict[str, Any]:
        """The ``[[sources.nut]]`` entry that watches this UPS."""
        return {"name": self.ups, "host": "127.0.0.1", "port": self.port, "ups": self.ups,
                **overrides}

    def _logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.dir / name).read_text(errors='replace')[-2000:]}"
                         for name in ("driver.log", "upsd.log") if (self.dir / name).exists())

    def __enter__(self) -> NutServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _quoted(value: str) -> str:
    """A value for NUT's config files: quoted, ``\\`` and ``"`` escaped (parseconf rules)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _running(proc: subprocess.Popen[bytes] | None) -> bool:
    return proc is not None and proc.poll() is None
