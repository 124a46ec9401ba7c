"""The NUT network protocol's text commands (docs/net-protocol.txt of NUT), over asyncio streams.

One request, one reply line (``ERR <CODE>`` on refusal); lists come as ``BEGIN LIST ...``, one
line per item, ``END LIST ...``. Arguments and values are words or double-quoted strings with
backslash escapes (NUT's parseconf rules), in both directions.

Why not aionut (4.3.4, the client Home Assistant uses): it has no ``LOGIN``, so a wrong password
is never noticed (upsd answers ``OK`` to any ``PASSWORD`` and checks it only at ``LOGIN``, ``SET``
or ``INSTCMD``); it writes every command it sends, ``PASSWORD <secret>`` included, to its debug
log; and it keeps list values' escapes (``\\"``) as they came. The four commands this source
needs are a few lines each.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["NutClient", "NutError", "NutProtocolError", "quote", "split_words"]

MAX_LIST_ITEMS: Final = 10_000  # a UPS has a few hundred variables at most
LINE_LIMIT: Final = 64 * 1024


class NutError(Exception):
    """upsd refused a request: ``ERR <code>`` (UNKNOWN-UPS, DATA-STALE, ACCESS-DENIED ...)."""

    def __init__(self, code: str, command: str) -> None:
        super().__init__(f"ERR {code} (to {command})")
        self.code = code
        self.command = command


class NutProtocolError(Exception):
    """The server's reply is not what the protocol says (not a NUT server, a garbled line)."""


def split_words(line: str) -> list[str]:
    """Pure: one protocol line -> its words, quotes removed and escapes resolved. Raises
    ValueError for an unterminated quote or a trailing backslash."""
    words: list[str] = []
    word: list[str] = []
    in_word = quoted = escaped = False
    for ch in line:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = in_word = True
        elif ch == '"':
            quoted = not quoted
            in_word = True
        elif ch in " \t" and not quoted:
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(ch)
            in_word = True
    if quoted or escaped:
        raise ValueError("unterminated quote or escape")
    if in_word:
        words.append("".join(word))
    return words


def quote(arg: str) -> str:
    """An argument as the protocol wants it: quoted, with ``"`` and ``\\`` escaped."""
    if any(ch in arg for ch in "\r\n"):
        raise ValueError("a protocol argument cannot hold a line break")
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


class NutClient:
    """One connection to upsd. Every request is bounded by `timeout_s`; OSError, TimeoutError
    and EOFError mean the connection is lost, `NutError` that upsd refused, `NutProtocolError`
    that the peer does not speak NUT."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout_s: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout_s = timeout_s
        self.logged_in = False

    @classmethod
    async def connect(cls, host: str, port: int, timeout_s: float) -> NutClient:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=LINE_LIMIT)
        return cls(reader, writer, timeout_s)

    async def _line(self) -> str:
        try:
            raw = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise EOFError("connection closed by the server") from exc
        except asyncio.LimitOverrunError as exc:
            raise NutProtocolError(f"reply line longer than {LINE_LIMIT} bytes") from exc
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise NutProtocolError(f"reply is not text: {raw[:64]!r}") from exc

    async def request(self, command: str, shown: str | None = None) -> str:
        """Send one command line and return the reply line. `shown` is how errors name the
        command (a password is never part of it)."""
        name = shown if shown is not None else command
        async with asyncio.timeout(self._timeout_s):
            self._writer.write(command.encode("utf-8") + b"\n")
            await self._writer.drain()
            reply = await self._line()
        if reply.startswith("ERR"):
            words = reply.split()
            raise NutError(words[1] if len(words) > 1 else "UNKNOWN", name)
        return reply

    async def list_vars(self, ups: str) -> dict[str, str]:
        """``LIST VAR <ups>``: every variable of the UPS and its value (as text)."""
        command = f"LIST VAR {ups}"
        begin = await self.request(command)
        if begin != f"BEGIN {command}":
            raise NutProtocolError(f"expected 'BEGIN {command}', got {begin[:80]!r}")
        values: dict[str, str] = {}
        async with asyncio.timeout(self._timeout_s):
            while (line := await self._line()) != f"END {command}":
                try:
                    words = split_words(line)
                except ValueError as exc:
                    raise NutProtocolError(f"{exc}: {line[:80]!r}") from exc
                if len(words) != 4 or words[0] != "VAR" or words[1] != ups:
                    raise NutProtocolError(f"not a VAR line of {ups}: {line[:80]!r}")
                values[words[2]] = words[3]
                if len(values) > MAX_LIST_ITEMS:
                    raise NutProtocolError(f"more than {MAX_LIST_ITEMS} variables")
        return values

    async def login(self, ups: str, username: str, password: str) -> None:
        """Authenticate and attach to `ups` as upsmon does; NutError ACCESS-DENIED when the
        user or password is wrong or the user has no upsmon role."""
        await self.request(f"USERNAME {quote(username)}")
        await self.request(f"PASSWORD {quote(password)}", shown="PASSWORD ***")
        await self.request(f"LOGIN {ups}")
        self.logged_in = True

    async def close(self) -> None:
        """``LOGOUT`` when logged in (so upsd stops counting this client at once), then close.
        Idempotent; never raises."""
        try:
            if self.logged_in and not self._writer.is_closing():
                self.logged_in = False
                await self.request("LOGOUT")
        except (OSError, TimeoutError, EOFError, NutError, NutProtocolError):
            pass  # the server is gone or refuses: the connection ends below either way
        finally:
            self._writer.close()
