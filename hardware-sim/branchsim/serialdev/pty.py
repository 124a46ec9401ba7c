"""A simulated serial device on a pty pair, served from its own thread.

The agent opens a stable path (a symlink in the simulator's workdir, like /dev/ttyUSB0)
that points at the pty's slave side; the device reads and writes the master side from an
asyncio loop in its own thread. The simulator also keeps the slave open, so the master never
sees EIO while the agent is between reconnects, and data written meanwhile waits in the
tty's buffer as it would in a USB adapter's.

Unplug closes the pair and removes the symlink: the agent's open port reads EOF, and its
reopen fails with ENOENT. Replug makes a new pair and re-points the symlink.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import tty
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

__all__ = ["PtyDevice"]

T = TypeVar("T")
OUT_LIMIT = 1 << 20  # bytes queued for the agent before the device starts dropping


class PtyDevice(ABC):
    """Base of every simulated serial device (see `SimSerialDevice` in `branchsim.serialdev`).

    Subclasses implement `received` (bytes from the agent), `apply_step` (their scenario
    steps) and `agent_config`; everything they do runs on the device's loop thread, so they
    need no locks: `apply`, `unplug` and `replug` hop onto that thread and wait for it.
    """

    kind: str = "serial"
    link_prefix: str = "ttySIM"

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.path = str(Path(workdir) / f"{self.link_prefix}-{name}")
        self.log = structlog.get_logger(__name__).bind(device=f"{self.kind}.{name}")
        self.plugged = False
        self.written = 0
        self.dropped = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._out = bytearray()
        self._writing = False

    # -- lifecycle (any thread) -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        loop = self._loop

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=serve, name=f"sim-{self.kind}-{self.name}")
        self._thread.daemon = True  # a forgotten stop() must not hang interpreter exit
        self._thread.start()
        ready.wait(5.0)
        self._call(self._plug)
        self._call(self.on_start)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._call(self._unplug)
        self._call(self._cancel_tasks)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        loop.close()
        self._loop = None
        self._thread = None

    def unplug(self) -> None:
        if self._loop is not None:
            self._call(self._unplug)

    def replug(self) -> None:
        if self._loop is not None:
            self._call(self._replug)

    def apply(self, step: Mapping[str, Any]) -> None:
        """One scenario step (keys besides ``at``/``device``)."""
        step = {k: v for k, v in step.items() if k not in ("at", "device")}
        if step.pop("unplug", False):
            self.unplug()
        if step.pop("replug", False):
            self.replug()
        if step:
            self._call(lambda: self.apply_step(step))

    # -- for subclasses ----------------------------------------------------------------------

    @abstractmethod
    def received(self, data: bytes) -> None:
        """Bytes the agent wrote (loop thread)."""

    @abstractmethod
    def apply_step(self, step: Mapping[str, Any]) -> None:
        """A device-specific scenario step (loop thread); raises ValueError for unknown keys."""

    @abstractmethod
    def agent_config(self) -> dict[str, Any]:
        """This device's entry for the agent's ``[[sources.serial.<kind>]]``."""

    def on_start(self) -> None:  # noqa: B027  # optional hook: most devices need no timers
        """Called once on the loop thread after the first plug (start timers here)."""

    def write(self, data: bytes) -> None:
        """Send bytes to the agent. What the tty cannot take now is sent when it drains (a
        70 kB line must arrive whole); past `OUT_LIMIT` unsent bytes nobody is reading, and
        further data is dropped, as on a wire with nobody listening."""
        if self._master is None or len(self._out) + len(data) > OUT_LIMIT:
            self.dropped += len(data)
            return
        self._out += data
        self._flush()

    def _flush(self) -> None:
        if self._master is None:
            return
        try:
            n = os.write(self._master, self._out) if self._out else 0
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:  # the pair is going away; what was queued is lost with it
            n = len(self._out)
        del self._out[:n]
        self.written += n
        if self._out and not self._writing:
            self.loop.add_writer(self._master, self._flush)
            self._writing = True
        elif not self._out and self._writing:
            self.loop.remove_writer(self._master)
            self._writing = False

    def spawn(self, coro: Any) -> None:
        """Run a coroutine on the device loop, keeping a reference until it is done."""
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "device not started"
        return self._loop

    # -- internals (loop thread) -------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop thread and wait for it (directly when not started)."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                fut.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return fut.result(10.0)

    def _plug(self) -> None:
        if self.plugged:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or line editing before the agent configures the port
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        tmp = f"{self.path}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(os.ttyname(slave), tmp)
        os.replace(tmp, self.path)  # atomic: the path never points at nothing while plugged
        self.loop.add_reader(master, self._readable)
        self.plugged = True
        self.log.debug("sim.serial.plugged", pty=os.ttyname(slave), path=self.path)

    def _unplug(self) -> None:
        if not self.plugged:
            return
        assert self._master is not None and self._slave is not None
        self.loop.remove_reader(self._master)
        if self._writing:
            self.loop.remove_writer(self._master)
            self._writing = False
        self.dropped += len(self._out)
        self._out.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = None
        self.plugged = False
        self.log.debug("sim.serial.unplugged", path=self.path)

    def _replug(self) -> None:
        self._unplug()
        self._plug()

    def _readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EIO: nobody has the slave open; nothing to read
        if data:
            self.received(data)

    def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
