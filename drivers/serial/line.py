"""Line-protocol serial devices: one reading set per text line (kv, csv or JSON lines).

Everything from bytes to values is pure: `LineSplitter` cuts a byte stream into bounded
lines, `decode_line` turns one line into named values, `LineDecoder` maps them to readings.
Bad input (over-long lines, bytes that are not ASCII/UTF-8, lines that do not parse) is
counted by kind and logged as hex at debug; it never raises into the caller.

A line device talks without being asked, so one that spews lines (a firmware bug, a miswired
cable echoing noise) is held to ``rate_limit_hz`` lines per second after a burst of
``rate_burst``: every line the splitter cuts takes a token before it is decoded, and the lines
over the limit are dropped, counted (``rate_limited``) and logged at most once per
`REJECT_LOG_INTERVAL`. Memory is bounded as well: of a line with no terminator yet the
splitter keeps at most `max_len` bytes (plus a terminator's and one read's worth).
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import structlog

from agent.core.clock import Clock
from agent.core.types import Reading, Value
from drivers.ratelimit import REJECT_LOG_INTERVAL, LogGate, TokenBucket
from drivers.serial.config import LineConfig, LineField, LineFormat
from drivers.serial.port import PortSource, open_port, read_some

__all__ = [
    "LineConfig",
    "LineDecoder",
    "LineField",
    "LineSource",
    "LineSplitter",
    "decode_line",
]

log = structlog.get_logger(__name__)

Fields = dict[str, Value]


class LineSplitter:
    """Stream framer: feed chunks, get complete lines (terminator and a trailing CR removed).

    A line longer than `max_len` is dropped whole (up to its terminator) and counted as
    ``overlong``, so one runaway device cannot grow the buffer without bound: between two
    `feed` calls at most ``max_len + len(terminator)`` bytes wait for their terminator.
    """

    def __init__(self, terminator: bytes = b"\n", max_len: int = 512) -> None:
        if not terminator:
            raise ValueError("terminator must not be empty")
        self.terminator = terminator
        self.max_len = max_len
        self.errors: Counter[str] = Counter()
        self._buf = bytearray()
        self._discarding = False

    def feed(self, chunk: bytes) -> list[bytes]:
        lines: list[bytes] = []
        self._buf += chunk
        while True:
            end = self._buf.find(self.terminator)
            if end < 0:
                # No terminator: room for a whole line, a CR and a terminator split across reads
                # (so the outcome never depends on where the reads cut the stream); more is an
                # over-long line, dropped as it arrives.
                if len(self._buf) > self.max_len + len(self.terminator):
                    if not self._discarding:
                        self.errors["overlong"] += 1
                        log.debug("line.overlong", head=bytes(self._buf[:32]).hex())
                    self._discarding = True
                    # keep what may be the start of the terminator that ends the long line
                    del self._buf[: len(self._buf) - len(self.terminator) + 1]
                return lines
            line = bytes(self._buf[:end])
            del self._buf[: end + len(self.terminator)]
            if self._discarding:  # the tail of an over-long line
                self._discarding = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.max_len:
                self.errors["overlong"] += 1
                log.debug("line.overlong", head=line[:32].hex())
                continue
            if line:
                lines.append(line)

    def reset(self) -> None:
        """Forget a partial line (after a reconnect its start belongs to another session)."""
        self._buf.clear()
        self._discarding = False


def _scalar(text: str) -> Value:
    """A field's text as a number or bool where it is one, else the text."""
    low = text.strip().lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    try:
        number = float(low)
    except ValueError:
        return text.strip()
    return number if math.isfinite(number) else None


def _parse_kv(text: str, _columns: Sequence[str]) -> Fields | None:
    """``key=value`` tokens. A second ``=`` in a token is two tokens run together (the tail of
    a line cut off by a reset, then a whole one): the line is malformed, never a reading."""
    fields: Fields = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or not key or not value or "=" in value:
            return None
        fields[key] = _scalar(value)
    return fields or None


def _parse_csv(text: str, columns: Sequence[str]) -> Fields | None:
    row = next(csv.reader([text]), [])
    if len(row) != len(columns) or [c.strip() for c in row] == list(columns):
        return None  # wrong width, or the header line a device prints after a reset
    return {name: _scalar(cell) for name, cell in zip(columns, row, strict=True)}


def _parse_json(text: str, _columns: Sequence[str]) -> Fields | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    fields: Fields = {}
    for key, value in obj.items():
        if isinstance(value, bool | str):
            fields[key] = value
        elif isinstance(value, int | float) and math.isfinite(value):
            fields[key] = float(value)
    return fields or None


PARSERS: Mapping[str, Callable[[str, Sequence[str]], Fields | None]] = {
    "kv": _parse_kv,
    "csv": _parse_csv,
    "json": _parse_json,
}


def decode_line(
    line: bytes, fmt: LineFormat, columns: Sequence[str] = ()
) -> tuple[Fields | None, str | None]:
    """One line -> (fields, None), or (None, error kind) with kind ``framing`` (not text:
    high-bit bytes, control characters, a stray CR) or ``malformed`` (text that does not parse)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "framing"
    if any(ch < " " and ch != "\t" for ch in text):
        return None, "framing"
    fields = PARSERS[fmt](text, columns)
    if fields is None:
        return None, "malformed"
    return fields, None


class LineDecoder:
    """Pure: a line in, readings out (for one configured device)."""

    def __init__(self, cfg: LineConfig, source: str) -> None:
        self.cfg = cfg
        self.source = source
        self.errors: Counter[str] = Counter()

    def decode(self, line: bytes, ts: float | None = None) -> list[Reading]:
        fields, error = decode_line(line, self.cfg.format, self.cfg.columns)
        if fields is None:
            self.errors[error or "malformed"] += 1
            log.debug("line.bad", source=self.source, error=error, line=line[:128].hex())
            return []
        readings: list[Reading] = []
        for key, value in fields.items():
            spec = self.cfg.fields.get(key)
            if spec is None:
                if self.cfg.fields:
                    continue  # a field nobody asked for
                readings.append(Reading(self.source, key, value, None, ts))
                continue
            scaled: Value = value
            if isinstance(value, int | float) and not isinstance(value, bool):
                scaled = value * spec.scale
            readings.append(Reading(self.source, spec.type, scaled, spec.unit, ts, spec.priority))
        return readings


class LineSource(PortSource):
    """Reads lines from the port; readings per line; reconnects by itself."""

    kind = "line"

    def __init__(self, cfg: LineConfig, clock: Clock) -> None:
        super().__init__(cfg, clock)
        self.decoder = LineDecoder(cfg, self.name)
        self.splitter = LineSplitter(cfg.terminator.encode(), cfg.max_line)
        self.bucket = TokenBucket(cfg.rate_limit_hz, cfg.rate_burst, clock.monotonic)
        self._gate = LogGate(REJECT_LOG_INTERVAL, clock.monotonic)

    async def session(self) -> None:
        reader, writer = await open_port(self.cfg)
        self.splitter.reset()
        try:
            await self.connected()
            while True:
                # A long timeout only bounds the wait; a silent line device is not an error.
                data = await read_some(reader, max(self.cfg.timeout_s, 60.0))
                if data is None:
                    continue
                for line in self.splitter.feed(data):
                    if not self.bucket.take():
                        self._rate_limited()
                        continue
                    readings = self.decoder.decode(line, self.clock.time())
                    await self.emit_many(readings)
                self._sync_errors()
        finally:
            writer.close()

    def _rate_limited(self) -> None:
        self.health.count("rate_limited")
        held = self._gate.open()
        if held is not None:
            self.log.warning(
                "serial.rate_limited",
                port=self.cfg.port,
                rate_hz=self.bucket.rate,
                not_logged_since_last=held,
                total=self.health.errors["rate_limited"],
            )

    def _sync_errors(self) -> None:
        for what, n in (self.decoder.errors + self.splitter.errors).items():
            self.health.errors[what] = n
