"""The systemd files the agent ships (the unit, the sysusers.d and tmpfiles.d snippets): their
names, and where they are in a checkout or an installed distribution."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_EXEC", "DIST_NAME", "SNIPPET", "UNIT_NAME", "unit_text", "units_dir"]

UNIT_NAME = "branch-agent.service"
DEFAULT_EXEC = "/opt/branch-agent/bin/branch-agent"
SNIPPET = "branch-agent.conf"
DIST_NAME = "branch-gateway-agent"


def units_dir() -> Path:
    """The shipped systemd/ directory: beside the agent package in a checkout or an editable
    install; else where the wheel put it (``<prefix>/share/branch-agent/systemd``, found through
    the distribution's file list, so any prefix or venv works). Raises FileNotFoundError."""
    here = Path(__file__).resolve().parents[3] / "systemd"
    if (here / UNIT_NAME).is_file():
        return here
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(DIST_NAME)
    except PackageNotFoundError:
        dist = None
    if dist is not None:
        for f in dist.files or []:
            if f.name == UNIT_NAME and "systemd" in f.parts:
                found = Path(str(dist.locate_file(f))).resolve().parent
                if (found / UNIT_NAME).is_file():
                    return found
    raise FileNotFoundError(
        f"the agent's systemd units are not installed (looked in {here} and in the files of "
        f"the {DIST_NAME} distribution); reinstall it with pip"
    )


def unit_text(exec_path: str) -> bytes:
    """The shipped unit, running `exec_path`."""
    return (units_dir() / UNIT_NAME).read_text().replace(DEFAULT_EXEC, exec_path).encode()
