"""`make release`: the Debian packages of the product and the simulator for each gateway
architecture, built on any machine from the locks, and a signed apt repository of them.

    python -m tests.support.release [--arch arm64 --arch amd64] [--version 0.1.0-1]
                                    [--out dist/release] [--key FINGERPRINT]

Per architecture: the locked wheels for CPython 3.11 on that architecture (`make wheelhouse`,
hash-checked against the locks), installed into a staging tree (`pip install --target` for the
target platform: nothing is compiled, nothing resolved), launchers that run Debian's python3
on them, the docs; then `dpkg-buildpackage` with the packaging in systemd/debian/ (debhelper:
the unit, the sysusers and tmpfiles snippets, the maintainer scripts), and lintian on the
result. Then reprepro files the packages into `OUT/repo` (dists/<codename>/InRelease, pool/),
signed with `--key` from the caller's GnuPG home, or with a key made for this run (a test
build: its public half is exported all the same). The public key is exported beside the
repository as `OUT/repo/branch-agent-archive-keyring.asc`, for `signed-by=`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from tests.support.lock import RUNTIME_LOCK, SIM_LOCK, normalise, read_lock

ROOT = Path(__file__).resolve().parents[2]
PY_ARCH = {"arm64": "aarch64", "amd64": "x86_64"}  # Debian architecture -> wheel platform
MANYLINUX = ["manylinux2014"] + [f"manylinux_2_{v}" for v in (17, 24, 26, 27, 28, 31, 32, 33,
                                                               34, 35, 36)]
SDIST_ONLY = {"pyric"}  # pure Python, published as an sdist only (see the Makefile's lock)
CODENAME, SUITE = "bookworm", "stable"

LAUNCHER = """#!/usr/bin/python3 -I
# {name}, from the Debian package {package}: Debian's python3 with the locked Python packages
# in {libs} (installed from the package, offline). -I: no user site, no PYTHONPATH.
import sys

sys.path[:0] = {libs!r}
from {module} import main

sys.exit(main())
"""


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=True)


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def pinned_requirements(lock: Path, names: set[str], out: Path) -> Path:
    """A requirements file of `names` from `lock`, with their hashes."""
    pins = read_lock(lock)
    lines = [f"{p.name}=={p.version} " + " ".join(f"--hash=sha256:{h}" for h in p.hashes)
             for n, p in sorted(pins.items()) if n in names]
    out.write_text("\n".join(lines) + "\n")
    return out


def vendor(target: Path, lock_names: set[str], lock: Path, wheelhouse: Path, arch: str,
           wheels: list[Path], work: Path) -> None:
    """Install the locked packages `lock_names` of `lock` for `arch`, and `wheels`, into
    `target` (a plain directory put on sys.path by the launcher)."""
    platforms = [a for p in MANYLINUX for a in ("--platform", f"{p}_{PY_ARCH[arch]}")]
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--no-index",
           "--no-compile", "--find-links", str(wheelhouse), "--target", str(target)]
    binary = lock_names - SDIST_ONLY
    req = pinned_requirements(lock, binary, work / f"{target.name}-binary.txt")
    run(*pip, "--require-hashes", "--no-deps", "--only-binary=:all:", *platforms,
        "--python-version", "3.11", "--implementation", "cp", "-r", req)
    for name in sorted(lock_names & SDIST_ONLY):
        # pure Python: built here, architecture-independent; the sdist's hash was checked by
        # `make wheelhouse`
        sdist = next(f for f in wheelhouse.glob("*.tar.gz")
                     if normalise(f.name.rsplit("-", 1)[0]) == name)
        run(*pip, "--no-deps", "--no-build-isolation", sdist)
    if wheels:
        run(*pip, "--no-deps", *wheels)
    for junk in target.glob("bin"):
        shutil.rmtree(junk)  # console scripts for the build host's Python: launchers instead


def glibc_needed(wheelhouse: Path) -> str:
    """The newest glibc a wheel of `wheelhouse` needs: for each wheel the oldest its platform
    tags accept (manylinux2014 = 2.17), the newest of those over all wheels."""
    need = (2, 17)
    for whl in wheelhouse.glob("*.whl"):
        tags = whl.stem.split("-")[-1].split(".")
        versions = [(2, 17) if t.startswith("manylinux2014") else
                    (int(t.split("_")[1]), int(t.split("_")[2]))
                    for t in tags if t.startswith("manylinux")]
        if versions:
            need = max(need, min(versions))
    return f"{need[0]}.{need[1]}"


def launcher(path: Path, name: str, package: str, module: str, libs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LAUNCHER.format(name=name, package=package, module=module, libs=libs))
    path.chmod(0o755)


def stage(arch: str, version: str, work: Path) -> Path:
    """The source tree dpkg-buildpackage builds from, for `arch`."""
    wheelhouse = ROOT / "dist" / f"wheelhouse-{PY_ARCH[arch]}"
    run("make", "--no-print-directory", "wheelhouse", f"ARCH={PY_ARCH[arch]}", cwd=ROOT)
    src = work / arch / f"branch-agent-{version}"
    shutil.rmtree(src.parent, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(ROOT / "systemd" / "debian", src / "debian")
    shutil.copy(ROOT / "systemd" / "branch-agent.service", src / "debian" / "branch-agent.service")
    shutil.copy(ROOT / "systemd" / "sysusers.d" / "branch-agent.conf",
                src / "debian" / "branch-agent.sysusers")
    shutil.copy(ROOT / "systemd" / "tmpfiles.d" / "branch-agent.conf",
                src / "debian" / "branch-agent.tmpfiles")
    (src / "debian" / "changelog").write_text(
        f"branch-agent ({version}) {CODENAME}; urgency=medium\n\n"
        f"  * Release {version}: see the project's git history.\n\n"
        " -- Branch gateway team <branch-gateway@bank.example>  "
        + subprocess.run(["date", "-R"], capture_output=True, text=True, check=True).stdout)

    # the vendored shared libraries' one Debian dependency (debian/rules: ${vendored:Depends})
    (src / "debian" / "vendored-depends").write_text(
        f"libc6 (>= {glibc_needed(wheelhouse)})\n")
    product = set(read_lock(RUNTIME_LOCK))
    simulator = set(read_lock(SIM_LOCK)) - product
    agent_root = src / "pkgroot" / "branch-agent"
    agent_lib = "/opt/branch-agent/lib"
    vendor(agent_root / agent_lib.lstrip("/"), product, RUNTIME_LOCK, wheelhouse, arch,
           sorted(wheelhouse.glob("branch_gateway_agent-*.whl")), work / arch)
    launcher(agent_root / "opt/branch-agent/bin/branch-agent", "branch-agent", "branch-agent",
             "agent.ops.cli", [agent_lib])
    docs = agent_root / "opt/branch-agent/share/doc"
    docs.mkdir(parents=True)
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        shutil.copy(md, docs / md.name)
    (agent_root / "etc/branch-agent").mkdir(parents=True)
    shutil.copy(ROOT / "config" / "example.toml",
                agent_root / "etc/branch-agent/agent.toml.example")

    sim_root = src / "pkgroot" / "branch-gateway-sim"
    sim_lib = "/opt/branch-gateway-sim/lib"
    vendor(sim_root / sim_lib.lstrip("/"), simulator, SIM_LOCK, wheelhouse, arch,
           sorted(wheelhouse.glob("branch_gateway_sim-*.whl")), work / arch)
    for name, module in (("branch-sim", "branchsim.cli"),
                         ("branch-platform", "branchsim.platform.cli")):
        launcher(sim_root / "opt/branch-gateway-sim/bin" / name, name, "branch-gateway-sim",
                 module, [sim_lib, agent_lib])
    return src


def build(src: Path, arch: str) -> list[Path]:
    run("dpkg-buildpackage", "-b", "-uc", "-us", "-d", f"--host-arch={arch}", cwd=src)
    return sorted(src.parent.glob(f"*_{arch}.deb"))


def test_key(home: Path) -> str:
    """A signing key made for this run (no passphrase): a test build's repository."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**os.environ, "GNUPGHOME": str(home)}
    run("gpg", "--batch", "--quiet", "--passphrase", "", "--quick-generate-key",
        "branch-agent test release key (made per build) <release-test@bank.example>",
        "ed25519", "sign", "1d", env=env)
    out = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


def repository(out: Path, debs: list[Path], key: str, env: dict[str, str]) -> Path:
    repo = out / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    (repo / "conf").mkdir(parents=True)
    (repo / "conf" / "distributions").write_text(
        f"Origin: bank\nLabel: branch-agent\nSuite: {SUITE}\nCodename: {CODENAME}\n"
        "Architectures: arm64 amd64\nComponents: main\n"
        "Description: the bank's branch gateway agent\n"
        f"SignWith: {key}\n")
    (repo / "conf" / "options").write_text("basedir .\n")
    for deb in debs:
        run("reprepro", "-b", repo, "includedeb", CODENAME, deb, env=env)
    shutil.rmtree(repo / "db")  # reprepro's bookkeeping: not part of what a mirror serves
    shutil.rmtree(repo / "conf")
    with (repo / "branch-agent-archive-keyring.asc").open("w") as f:
        subprocess.run(["gpg", "--batch", "--armor", "--export", key], env=env, stdout=f,
                       check=True)
    return repo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(PY_ARCH))
    ap.add_argument("--version", default=f"{project_version()}-1",
                    help="the packages' Debian version (default: the project's, -1)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist" / "release")
    ap.add_argument("--key", help="sign with this key of $GNUPGHOME (default: a key made for "
                                  "this run, for tests)")
    args = ap.parse_args(argv)
    archs = args.arch or ["arm64", "amd64"]
    out: Path = args.out.resolve()
    built: list[Path] = []
    work = ROOT / "build" / "release"
    for arch in archs:
        debs = build(stage(arch, args.version, work), arch)
        run("lintian", "--fail-on", "error", "--suppress-tags", "bad-distribution-in-changes-file",
            *debs)
        built += debs
    # after the builds: `make wheelhouse` starts again from an empty dist/
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    debs = []
    for deb in built:
        shutil.copy(deb, out / deb.name)
        debs.append(out / deb.name)
    with tempfile.TemporaryDirectory(prefix="release-gnupg-") as tmp:
        env = dict(os.environ)
        key = args.key
        if key is None:
            env["GNUPGHOME"] = str(Path(tmp) / "gnupg")
            key = test_key(Path(env["GNUPGHOME"]))
        repo = repository(out, debs, key, env)
    print(f"{out}: {', '.join(d.name for d in debs)}; signed repository {repo} (key {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
