"""`make release` for the architecture of this machine (amd64 in CI): the Debian packages build
from the locks, lintian finds no error, the vendored agent runs on Debian's own python3 with
nothing else, and apt takes the signed repository and refuses it tampered. Installing,
upgrading and purging in an arm64 Debian root is `make field-test` (not in CI: it downloads a
Debian root and runs under emulation)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine)
TOOLS = ("dpkg-buildpackage", "dh", "lintian", "reprepro", "gpg", "apt-get")
DEBIAN_PYTHON = Path("/usr/bin/python3")

pytestmark = [
    # Building both packages and running lintian takes 1-3 minutes on a shared 2-core machine
    # (it ran past the default 120 s in CI); the module-scoped build counts against the first test.
    pytest.mark.timeout(600),
    pytest.mark.skipif(ARCH is None, reason=f"no Debian package for {os.uname().machine}"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (make releasedeps)"),
]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("release")
    # The build's own lintian run (--fail-on error) fails it on any lintian error.
    subprocess.run([sys.executable, "-m", "tests.support.release", "--arch", str(ARCH),
                    "--out", str(out)], cwd=ROOT, check=True)
    yield out


def deb(release: Path, package: str) -> Path:
    [found] = release.glob(f"{package}_*_{ARCH}.deb")
    return found


def field(path: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(path), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_packages_install_the_debian_way(release: Path) -> None:
    """The unit, sysusers and tmpfiles snippets where systemd looks, enabled and started by the
    maintainer scripts (debhelper); the example config a conffile; Depends on Debian's python3
    3.11 and the glibc the wheels need; the simulator apart, on the same version."""
    agent = deb(release, "branch-agent")
    files = subprocess.run(["dpkg-deb", "-c", str(agent)], capture_output=True, text=True,
                           check=True).stdout
    for path in ("lib/systemd/system/branch-agent.service", "usr/lib/sysusers.d/branch-agent.conf",
                 "usr/lib/tmpfiles.d/branch-agent.conf", "usr/bin/branch-agent -> ",
                 "opt/branch-agent/bin/branch-agent", "opt/branch-agent/lib/agent/__init__.py",
                 "etc/branch-agent/agent.toml.example"):
        assert f"./{path}" in files, path
    assert "__pycache__" not in files, "byte code is made at install (postinst), not shipped"
    with_control = release / "control"
    subprocess.run(["dpkg-deb", "-e", str(agent), str(with_control)], check=True)
    assert (with_control / "conffiles").read_text().split() == [
        "/etc/branch-agent/agent.toml.example"]
    postinst = (with_control / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "deb-systemd-helper" in postinst
    assert "compileall" in postinst
    depends = field(agent, "Depends")
    assert "python3 (>= 3.11), python3 (<< 3.12)" in depends and "libc6 (>= 2." in depends
    sim = deb(release, "branch-gateway-sim")
    assert f"branch-agent (= {field(agent, 'Version')})" in field(sim, "Depends")


@pytest.mark.skipif(not DEBIAN_PYTHON.exists(), reason="no Debian python3 here")
def test_the_vendored_agent_runs_on_debians_python_alone(release: Path, tmp_path: Path) -> None:
    """Unpacked, the agent runs from its own directory on /usr/bin/python3 in isolated mode: no
    venv, no site-packages, nothing resolved."""
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb(release, "branch-agent")), str(root)], check=True)
    lib = root / "opt/branch-agent/lib"
    code = ("import sys; sys.path[:0] = [sys.argv.pop(1)]; from agent.ops.cli import main; "
            "sys.exit(main())")
    run = subprocess.run([str(DEBIAN_PYTHON), "-I", "-c", code, str(lib), "check-config",
                          str(ROOT / "config" / "example.toml")], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr
    imported = subprocess.run(
        [str(DEBIAN_PYTHON), "-I", "-c", "import sys; sys.path[:0] = [sys.argv[1]]; "
         "import agent.runtime.root, cryptography, cbor2, paho.mqtt.client, aiocoap, zstandard; "
         "print(cryptography.__file__)", str(lib)],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    assert imported.stdout.startswith(str(lib)), imported.stdout


def apt_update(tmp_path: Path, repo: Path) -> subprocess.CompletedProcess[str]:
    """`apt-get update` of `repo` alone, with its exported key as `signed-by`, in a private
    apt state (the machine's own is not touched)."""
    state = tmp_path / "apt"
    shutil.rmtree(state, ignore_errors=True)
    for d in ("state/lists/partial", "cache/archives/partial", "etc"):
        (state / d).mkdir(parents=True)
    key = repo / "branch-agent-archive-keyring.asc"
    (state / "etc/sources.list").write_text(f"deb [signed-by={key}] file:{repo} bookworm main\n")
    opts = [f"-oDir::State={state / 'state'}", f"-oDir::Cache={state / 'cache'}",
            f"-oDir::Etc::SourceList={state / 'etc/sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null", "-oDebug::NoLocking=1",
            f"-oAPT::Architecture={ARCH}"]
    return subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True)


def test_apt_takes_the_signed_repository_and_refuses_it_tampered(release: Path,
                                                                  tmp_path: Path) -> None:
    """The repository verifies with the key exported beside it; a package index changed after
    signing, or a signed index changed, and apt refuses the repository."""
    repo = release / "repo"
    ok = apt_update(tmp_path, repo)
    assert ok.returncode == 0 and "InRelease" in ok.stdout, ok.stdout + ok.stderr
    lists = tmp_path / "apt" / "state" / "lists"
    assert any(p.name.endswith(f"binary-{ARCH}_Packages") or "_Packages" in p.name
               for p in lists.iterdir())

    forged = tmp_path / "forged"
    shutil.copytree(repo, forged)
    packages = forged / f"dists/bookworm/main/binary-{ARCH}/Packages"
    packages.write_text(packages.read_text().replace("Version: ", "Version: 9", 1))
    for name in ("Packages.gz",):  # apt prefers the compressed index: give it the forged one
        (packages.parent / name).unlink()
    bad = apt_update(tmp_path, forged)
    assert bad.returncode != 0 and "Hash Sum mismatch" in bad.stdout + bad.stderr, (
        bad.stdout + bad.stderr)

    forged_sig = tmp_path / "forged-sig"
    shutil.copytree(repo, forged_sig)
    inrelease = forged_sig / "dists/bookworm/InRelease"
    inrelease.write_text(inrelease.read_text().replace("Label: branch-agent",
                                                       "Label: branch-agent-evil"))
    (forged_sig / "dists/bookworm/Release.gpg").unlink()
    bad = apt_update(tmp_path, forged_sig)
    assert bad.returncode != 0 and "signature" in (bad.stdout + bad.stderr).lower(), (
        bad.stdout + bad.stderr)
