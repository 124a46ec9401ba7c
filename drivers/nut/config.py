"""The NUT sources' config model (``[[sources.nut]]``: a UPS watched through a NUT server),
apart from the driver: loading a config opens no socket and imports nothing of the client."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.core.config import StrictModel, host_port, unique_names

__all__ = ["DEFAULT_VARIABLES", "NutConfig", "NutSourceList"]

# Source names become part of source ids ("nut.main") and MQTT topics: keep them plain (the same
# pattern as drivers.serial.config.NAME_PATTERN; drivers do not import each other).
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# A UPS name as upsd.conf/ups.conf spell it: one word, no quotes (NUT's own rule is looser, but
# a space or a quote here would break the text protocol's command line).
UPS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$"
# NUT variable names: dotted lower-case words ("battery.charge", "outlet.1.status").
VARIABLE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$"

DEFAULT_VARIABLES = (
    "ups.status",
    "battery.charge",
    "battery.runtime",
    "ups.load",
    "input.voltage",
    "output.voltage",
    "battery.voltage",
    "ups.temperature",
)


class NutConfig(StrictModel):
    """``[[sources.nut]]``: one UPS on one NUT server (upsd, TCP 3493); id ``nut.<name>``.

    Reading needs no account on upsd. With `username` and a password, the source logs in to the
    UPS as upsmon does (``LOGIN``, a ``upsmon secondary`` user in upsd.users): a wrong password
    is then refused and reported, and the server lists the gateway among the UPS's clients."""

    name: str = Field(pattern=NAME_PATTERN)
    host: str = Field(min_length=1)
    port: int = Field(default=3493, ge=1, le=65535)
    ups: str = Field(pattern=UPS_PATTERN)
    username: str | None = Field(default=None, pattern=r"^[^\s\"\\]{1,64}$")
    password: SecretStr | None = None  # never logged; prefer password_file
    password_file: Path | None = None  # a file holding the password (first line)
    poll_interval_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=3.0, gt=0)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=30.0, gt=0)
    variables: tuple[str, ...] = Field(default=DEFAULT_VARIABLES, min_length=1)

    @field_validator("variables")
    @classmethod
    def _variables(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if bad := [n for n in names if not re.fullmatch(VARIABLE_PATTERN, n)]:
            raise ValueError(f"not NUT variable names: {', '.join(bad)}")
        if dups := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"variables listed twice: {', '.join(dups)}")
        return names

    @model_validator(mode="after")
    def _credentials(self) -> NutConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        has_password = self.password is not None or self.password_file is not None
        if has_password != (self.username is not None):
            raise ValueError("username and a password (password or password_file) go together")
        return self

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)

    def read_password(self) -> str | None:
        """The password (None without credentials). A `password_file` is read at each call, so a
        rotated password is used at the next connection; raises OSError if it cannot be read."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        lines = self.password_file.read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else ""


# The `[[sources.nut]]` list as agent.config's SourcesConfig holds it: names unique.
NutSourceList = Annotated[list[NutConfig], unique_names("nut")]
