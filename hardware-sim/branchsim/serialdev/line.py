"""A simulated line-protocol sensor: prints one line per measurement, and misbehaves on cue.

Params: ``format`` kv (``temp=21.5 hum=40.0``) | csv (``columns`` order) | json;
``values = {temp = 21.5, hum = 40.0}`` (initial fields), ``interval_s`` (seconds between
lines from the device's own timer, default 1.0; 0 = only on ``emit`` steps), ``terminator``.
Steps: ``emit = "reading" | "garbage" | "partial" | "framing" | "long"`` with ``count``
(default 1), and ``set = {field = value}``.

- garbage: random-looking binary bytes ending in the terminator;
- partial: the first half of a line, then a fresh full line (the half is lost in it);
- framing: what a baud-rate or parity mismatch produces: bytes with the high bit set, and a
  line ended with a bare CR instead of the terminator;
- long: a line far longer than the agent's bound (it must be dropped and counted).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from branchsim.serialdev.pty import PtyDevice

__all__ = ["LineDevice"]

# known field names -> (reading type, SenML unit) for the agent config
KNOWN_FIELDS: dict[str, tuple[str, str]] = {
    "temp": ("temperature", "Cel"),
    "hum": ("humidity", "%RH"),
    "co2": ("co2", "ppm"),
    "pressure": ("pressure", "Pa"),
}
Emit = Literal["reading", "garbage", "partial", "framing", "long"]


class LineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["kv", "csv", "json"] = "kv"
    columns: list[str] = []
    values: dict[str, float | str | bool] = {"temp": 21.5, "hum": 40.0}
    interval_s: float = Field(default=1.0, ge=0)
    terminator: Literal["\n", "\r\n"] = "\n"
    seed: int = 0

    @model_validator(mode="after")
    def _columns(self) -> LineParams:
        if not self.columns:
            self.columns = list(self.values)
        if missing := sorted(set(self.columns) - set(self.values)):
            raise ValueError(f"columns without a value: {missing}")
        return self


class LineStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    emit: Emit | None = None
    count: int = Field(default=1, ge=1, le=10000)
    set: dict[str, float | str | bool] = {}


class LineDevice(PtyDevice):
    kind = "line"
    link_prefix = "ttyLINE"

    def __init__(self, name: str, params: Mapping[str, Any], workdir: Path) -> None:
        super().__init__(name, workdir)
        self.params = LineParams.model_validate(dict(params))
        self.values: dict[str, float | str | bool] = dict(self.params.values)
        self.term = self.params.terminator.encode()
        self.lines = 0
        self._rng = random.Random(self.params.seed)

    def on_start(self) -> None:
        if self.params.interval_s > 0:
            self._tick()

    def _tick(self) -> None:
        self.emit("reading")
        self.loop.call_later(self.params.interval_s, self._tick)

    def received(self, data: bytes) -> None:
        """A line sensor ignores what it is sent."""

    def line(self) -> bytes:
        p = self.params
        if p.format == "json":
            text = json.dumps(self.values, separators=(",", ":"))
        elif p.format == "csv":
            text = ",".join(_fmt(self.values[c]) for c in p.columns)
        else:
            text = " ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        return text.encode() + self.term

    def emit(self, what: Emit, count: int = 1) -> None:
        for _ in range(count):
            if what == "reading":
                data = self.line()
            elif what == "garbage":
                noise = bytes(self._rng.randrange(256) for _ in range(24))
                data = noise.replace(b"\n", b"\x00") + self.term
            elif what == "partial":
                full = self.line()
                data = full[: len(full) // 2] + full
            elif what == "framing":
                data = bytes(b | 0x80 for b in self.line()[:-1]) + b"\r" + self.term
            else:  # long
                data = b"x=" + b"9" * 70000 + self.term
            self.lines += 1
            self.write(data)

    def apply_step(self, step: Mapping[str, Any]) -> None:
        parsed = LineStep.model_validate(dict(step))
        self.values.update(parsed.set)
        if parsed.emit is not None:
            self.emit(parsed.emit, parsed.count)

    def agent_config(self) -> dict[str, Any]:
        fields = {
            key: {"type": KNOWN_FIELDS[key][0], "unit": KNOWN_FIELDS[key][1]}
            for key in self.values
            if key in KNOWN_FIELDS
        }
        config: dict[str, Any] = {
            "name": self.name,
            "port": self.path,
            "format": self.params.format,
            "terminator": self.params.terminator,
            "fields": fields,
        }
        if self.params.format == "csv":
            config["columns"] = list(self.params.columns)
        return config


def _fmt(value: float | str | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
