"""Integrity manifest of the installed agent: SHA-256 of every file of the distribution's
packages (agent, drivers: the product, not the simulator) and of the installed systemd unit and
its drop-ins.

`branch-agent provision` writes it to `{root}/usr/lib/branch-agent/manifest.json` (root-owned,
read-only for the service under `ProtectSystem=strict`, and outside the state dir that `wipe`
clears); `branch-agent doctor` verifies it and names every edited, missing or extra file.
Byte-code caches (`__pycache__`, `*.pyc`) are left out: Python rewrites them by itself.

Each tree is recorded with the absolute path it had when the manifest was written, so
provision must run with the gateway's own installation (on the gateway, or in a chroot of the
image), as docs/OPERATIONS.md says.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from agent.core.atomic import write_atomic
from agent.core.errors import OperatorError

__all__ = [
    "DIST",
    "MANIFEST_PATH",
    "PACKAGES",
    "IntegrityReport",
    "build_manifest",
    "installed_trees",
    "verify_manifest",
    "write_manifest",
]

DIST = "branch-gateway-agent"
MANIFEST_PATH = Path("/usr/lib/branch-agent/manifest.json")
PACKAGES = ("agent", "drivers")
FORMAT = 1
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass
class IntegrityReport:
    """What differs between the manifest and the files on disk (paths are absolute)."""

    checked: int = 0
    edited: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.edited or self.missing or self.extra)


def installed_trees() -> dict[str, Path]:
    """The directories of the installed packages (wherever this agent runs from)."""
    import importlib

    trees: dict[str, Path] = {}
    for name in PACKAGES:
        module = importlib.import_module(name)
        file = getattr(module, "__file__", None)
        if file is None:
            raise RuntimeError(f"package {name} has no __file__ (not installed from files)")
        trees[name] = Path(file).resolve().parent
    return trees


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def _walk(tree: Path) -> dict[str, Path]:
    """Every regular file under `tree` by its POSIX relative path, byte-code caches left out."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            if name.endswith(_SKIP_SUFFIXES):
                continue
            p = Path(dirpath) / name
            out[p.relative_to(tree).as_posix()] = p
    return out


def build_manifest(trees: Mapping[str, Path],
                   files: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """The manifest of whole directory trees (`trees`: label -> dir) and of single files
    (`files`: label -> file, e.g. the installed unit)."""
    try:
        version = metadata.version(DIST)
    except metadata.PackageNotFoundError:
        version = "unknown"
    doc: dict[str, Any] = {
        "format": FORMAT, "dist": DIST, "version": version,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trees": {}, "files": {},
    }
    for label, tree in sorted(trees.items()):
        tree = Path(tree).resolve()
        doc["trees"][label] = {"path": str(tree),
                               "sha256": {rel: _sha256(p) for rel, p in _walk(tree).items()}}
    for label, path in sorted((files or {}).items()):
        doc["files"][label] = {"path": str(Path(path).absolute()), "sha256": _sha256(path)}
    return doc


def write_manifest(path: Path, doc: Mapping[str, Any]) -> None:
    """Write atomically, 0644 (the manifest holds hashes, nothing secret)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), 0o644)


def verify_manifest(doc: Mapping[str, Any]) -> IntegrityReport:
    """Compare the manifest with the files on disk. Raises ValueError for a manifest that is
    not one (the caller reports that as a failure too)."""
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise OperatorError("not a branch-agent integrity manifest (format 1)")
    rep = IntegrityReport()
    try:
        trees = dict(doc["trees"])
        files = dict(doc["files"])
        for entry in trees.values():
            tree = Path(entry["path"])
            want: dict[str, str] = dict(entry["sha256"])
            have = _walk(tree) if tree.is_dir() else {}
            for rel, digest in sorted(want.items()):
                p = tree / rel
                rep.checked += 1
                if rel not in have:
                    rep.missing.append(str(p))
                elif _sha256(p) != digest:
                    rep.edited.append(str(p))
            rep.extra += [str(have[rel]) for rel in sorted(set(have) - set(want))]
        for entry in files.values():
            p = Path(entry["path"])
            rep.checked += 1
            if not p.is_file():
                rep.missing.append(str(p))
            elif _sha256(p) != entry["sha256"]:
                rep.edited.append(str(p))
    except (KeyError, TypeError, AttributeError) as exc:
        raise OperatorError(f"malformed manifest ({type(exc).__name__}: {exc})") from None
    return rep
