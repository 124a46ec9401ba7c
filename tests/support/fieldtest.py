"""`make field-test`: the gateway package where gateways run it, as root on a fresh Debian
machine (not in CI: it downloads a Debian root and runs it under emulation).

    python -m tests.support.fieldtest [--work DIR] [--keep] [--mirror URL]

1. `make release` twice for arm64 (the same code as version V-1 and as a newer build V-2),
   both repositories signed with one key made for the run.
2. An arm64 Debian bookworm root (mmdebstrap, python3 and systemd from Debian's packages),
   run under qemu-user-static (binfmt_misc); a real mosquitto (mutual TLS) and the reference
   platform on this machine.
3. In the root: the repository and its key added; a forged package index refused; `apt-get
   install branch-agent`; `branch-agent provision`; the bank's CA issues the client
   certificate; `check-config`; `doctor`.
4. The agent runs (a synthetic counter source) until the platform has its first events; the
   uplink is cut; with events buffered the agent is stopped (as the package's upgrade does
   with the service) and upgraded to V-2; started again, the uplink restored: every accepted
   event reaches the platform exactly once (counted at the wire: the stored batches), in one
   chain; keys and config unchanged.
5. Remove (program gone, config, keys and outbox kept); purge with events unsent (kept, with
   the message); install again, deliver, purge (config, keys and state gone, the audit log
   kept).
6. Figures: package size, install and upgrade time, start-up time, peak RSS, events/s
   delivered under emulation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.outbox import OutboxView
from branchsim.broker import Mosquitto
from branchsim.platform.mqtt_server import MqttPlatformServer, PlatformTls
from branchsim.platform.receiver import Receiver
from tests.support.pki import issue, make_pki
from tests.support.release import project_version, test_key

ROOT = Path(__file__).resolve().parents[2]
GW = "field-01"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCE = """
[[sources.synthetic]]
name = "field"
rate_hz = 50.0
batch = 5
count = 3000
waveform = "counter"
"""  # 3000 readings per start of the agent, then the source is done and the outbox drains


def sh(*cmd: str | Path, env: dict[str, str] | None = None, timeout: float = 1800,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], env=env, timeout=timeout, text=True,
                          capture_output=True)
    if check and done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until it holds; seconds it took. SystemExit naming `what` on timeout."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(0.2)  # polling interval of a condition wait
    return time.monotonic() - start


def binfmt() -> None:
    """Register qemu-aarch64 with binfmt_misc (F: the interpreter opened now, so it runs in a
    chroot too), mounting binfmt_misc first when it is not."""
    if not (BINFMT / "register").exists():
        sh("mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT)
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(QEMU_CONF.read_text().strip())


@dataclass
class Root:
    """The arm64 Debian root, with /proc, /sys and /dev mounted while in use."""

    path: Path
    mounts: list[Path] = field(default_factory=list)

    def mount(self) -> None:
        for what, args in (("proc", ["-t", "proc", "proc"]), ("sys", ["-t", "sysfs", "sysfs"]),
                           ("dev", ["--bind", "/dev"]), ("dev/pts", ["--bind", "/dev/pts"])):
            target = self.path / what
            target.mkdir(parents=True, exist_ok=True)
            sh("mount", *args, target)
            self.mounts.append(target)

    def umount(self) -> None:
        for target in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)
        self.mounts.clear()

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive", **extra}

    def run(self, *cmd: str, check: bool = True,
            timeout: float = 1800) -> subprocess.CompletedProcess[str]:
        return sh("chroot", self.path, *cmd, env=self.env(), check=check, timeout=timeout)

    def spawn(self, *cmd: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(["chroot", str(self.path), *cmd], env=self.env(**env),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def apt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *args)


@dataclass
class Figures:
    package_kb: int = 0
    install_s: float = 0.0
    upgrade_s: float = 0.0
    startup_s: float = 0.0
    peak_rss_mb: float = 0.0
    buffered: int = 0
    drain_ev_s: float = 0.0
    delivered: int = 0
    notes: list[str] = field(default_factory=list)


class Agent:
    """`branch-agent run` in the root as its own user, READY=1 on a socket in the root."""

    def __init__(self, root: Root, log: Path) -> None:
        self.root, self.log = root, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        sock_path = self.root.path / "run" / "field-notify.sock"
        sock_path.unlink(missing_ok=True)
        self.root.run("install", "-d", "-o", "branch-agent", "-g", "branch-agent", "-m", "0750",
                      "/run/branch-agent")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(sock_path))
            os.chmod(sock_path, 0o666)
            start = time.monotonic()
            self.proc = self.root.spawn(
                "runuser", "-u", "branch-agent", "--", "/usr/bin/branch-agent", "run",
                "--config", "/etc/branch-agent/agent.toml", log=self.log,
                NOTIFY_SOCKET="/run/field-notify.sock")
            sock.settimeout(1.0)
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"the agent exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
                if time.monotonic() - start > 300:
                    raise SystemExit("no READY=1 from the agent within 300 s")
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in sock.recv(4096).split(b"\n"):
                        return time.monotonic() - start

    def peak_rss_mb(self) -> float:
        """VmHWM of the agent (the qemu process running its python)."""
        out = subprocess.run(["pgrep", "-f", "branch-agent run --config"], capture_output=True,
                             text=True).stdout.split()
        peaks = []
        for pid in out:
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{pid}/status").read_text()
                peaks += [int(line.split()[1]) / 1024 for line in status.splitlines()
                          if line.startswith("VmHWM:")]
        return max(peaks, default=0.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            raise SystemExit("the agent did not stop within 120 s of SIGTERM") from None
        self.proc = None


def outbox_held(root: Root) -> int:
    db = root.path / "var/lib/branch-agent/outbox.db"
    if not db.exists():
        return 0
    with contextlib.suppress(Exception), OutboxView.open(db) as view:
        return sum(view.snapshot().depth.values())
    return -1


def accepted_upto(root: Root) -> int:
    """The highest id the agent has accepted (the outbox's next id - 1)."""
    db = root.path / "var/lib/branch-agent/outbox.db"
    if not db.exists():
        return 0
    with contextlib.suppress(Exception), OutboxView.open(db) as view:
        return view.snapshot().next_id - 1
    return 0


def undelivered(root: Root, rx: Receiver) -> int:
    """Events the agent accepted that the platform does not hold (the outbox's own count
    includes batches acknowledged but not yet deleted: acks are written with the next
    transaction)."""
    upto = accepted_upto(root)
    return upto - len(set(rx.delivered_ids(GW)) & set(range(1, upto + 1)))


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def release(version: str, out: Path, gnupg: Path, key: str) -> None:
    sh(sys.executable, "-m", "tests.support.release", "--arch", "arm64", "--version", version,
       "--out", out, "--key", key, env={**os.environ, "GNUPGHOME": str(gnupg)})


def serve_repo(root: Root, repo: Path) -> None:
    target = root.path / "srv/branch-agent"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(repo, target)


def field_test(work: Path, mirror: str) -> Figures:
    fig = Figures()
    version = project_version()
    gnupg = work / "gnupg"
    fpr = work / "release-key"
    if not fpr.exists():  # a kept work directory keeps its key and releases
        shutil.rmtree(gnupg, ignore_errors=True)
        fpr.write_text(test_key(gnupg))
        for old in ("rel1", "rel2"):
            shutil.rmtree(work / old, ignore_errors=True)
    key = fpr.read_text()
    repo1, repo2 = work / "rel1/repo", work / "rel2/repo"
    if not (repo1 / "dists/bookworm/InRelease").exists():
        release(f"{version}-1", work / "rel1", gnupg, key)
    if not (repo2 / "dists/bookworm/InRelease").exists():
        release(f"{version}-2", work / "rel2", gnupg, key)
    [deb] = (work / "rel1").glob("branch-agent_*_arm64.deb")
    fig.package_kb = deb.stat().st_size // 1024

    binfmt()
    root = Root(work / "root")
    if not (root.path / "usr/bin/python3").exists():
        shutil.rmtree(root.path, ignore_errors=True)
        sh("mmdebstrap", "--arch=arm64", "--variant=apt",
           "--include=python3,systemd,ca-certificates", "bookworm", root.path, mirror,
           timeout=3600)
    for old in ("pki", "broker"):  # a reused work directory: a new platform and broker
        shutil.rmtree(work / old, ignore_errors=True)
    for old in work.glob("platform.db*"):
        old.unlink()
    (work / "agent.log").unlink(missing_ok=True)
    pki = make_pki(work / "pki")
    broker = Mosquitto(work / "broker", tls=pki).start()
    rx = Receiver(work / "platform.db")
    server = MqttPlatformServer(rx, "127.0.0.1", broker.port,
                                tls=PlatformTls(pki.ca_cert, pki.platform_cert, pki.platform_key))
    server.start()
    agent = Agent(root, work / "agent.log")
    root.mount()
    try:
        if not server.ready.wait(20):
            raise SystemExit("the platform did not subscribe")
        # a reused root (FIELD_WORK) starts as a fresh image: no agent, no gateway
        root.run("dpkg", "--purge", "branch-agent", check=False)
        for old in ("etc/branch-agent", "var/lib/branch-agent"):
            shutil.rmtree(root.path / old, ignore_errors=True)
        # --- the repository, its key, a forged index refused
        keyring = root.path / "etc/apt/keyrings/branch-agent.asc"
        keyring.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo1 / "branch-agent-archive-keyring.asc", keyring)
        (root.path / "etc/apt/sources.list.d/branch-agent.list").write_text(
            "deb [signed-by=/etc/apt/keyrings/branch-agent.asc] file:/srv/branch-agent "
            "bookworm main\n")
        forged = work / "forged"
        shutil.rmtree(forged, ignore_errors=True)
        shutil.copytree(repo1, forged)
        index = forged / "dists/bookworm/main/binary-arm64/Packages"
        index.write_text(index.read_text().replace("Version: ", "Version: 9", 1))
        (index.parent / "Packages.gz").unlink()
        serve_repo(root, forged)
        for cached in (root.path / "var/lib/apt/lists").glob("_srv_branch-agent_*"):
            cached.unlink()  # a reused root fetches the index again
        refused = root.run("apt-get", "-q", "update", check=False)
        if refused.returncode == 0 or "Hash Sum mismatch" not in refused.stdout + refused.stderr:
            raise SystemExit(f"a forged index was not refused:\n{refused.stdout}{refused.stderr}")
        fig.notes.append("forged package index refused (Hash Sum mismatch)")
        serve_repo(root, repo1)
        root.apt("update")
        t0 = time.monotonic()
        root.apt("install", "--no-install-recommends", "branch-agent")
        fig.install_s = time.monotonic() - t0

        # --- provision, the CA's certificate, check-config, doctor
        root.run("branch-agent", "provision", "--gateway-id", GW, "--broker",
                 f"127.0.0.1:{broker.port}", "--non-interactive")
        tls = root.path / "etc/branch-agent/tls"
        issue(pki, tls / "client.csr", tls / "client.pem")
        shutil.copy(pki.ca_cert, tls / "ca.pem")
        for pem in (tls / "client.pem", tls / "ca.pem"):
            pem.chmod(0o644)
        cfg = root.path / "etc/branch-agent/agent.toml"
        cfg.write_text(cfg.read_text() + SOURCE)
        root.run("systemd-tmpfiles", "--create", "branch-agent.conf")  # as at boot
        root.run("branch-agent", "check-config", "/etc/branch-agent/agent.toml")
        # The root has no NTP (its clock check fails: `time_sync = auto`); the rest must pass.
        doctor = root.run("branch-agent", "doctor", check=False)
        results = {line[:20].strip(): line[20:30].strip()
                   for line in doctor.stdout.splitlines() if len(line) > 20}
        needed = ("config", "signing key", "state dir", "integrity", "mqtt certificate",
                  "mqtt tls handshake", "mqtt connect")
        if "Traceback" in doctor.stderr or any("pass" not in results.get(n, "") for n in needed):
            raise SystemExit(f"doctor:\n{doctor.stdout}\n{doctor.stderr}")
        fig.notes.append("doctor: " + ", ".join(f"{n} {results[n]}" for n in results
                                                if results[n][:1] in "✔✘-" and n))
        rx.register(GW, (root.path / "etc/branch-agent/keys/signing.pub").read_bytes())
        kept = [root.path / "etc/branch-agent/keys/signing.key", tls / "client.key", cfg]
        before = digest(*kept)

        # --- run, cut the uplink, buffer, upgrade, restore: exactly once
        fig.startup_s = agent.start()
        until(lambda: len(rx.events(GW)) >= 100, 300, "the first events at the platform")
        broker.stop()
        until(lambda: undelivered(root, rx) >= 500, 300, "events buffered with the uplink cut")
        fig.peak_rss_mb = agent.peak_rss_mb()
        agent.stop()
        fig.buffered = undelivered(root, rx)
        upto = accepted_upto(root)  # every id accepted before the upgrade
        serve_repo(root, repo2)
        root.apt("update")
        t0 = time.monotonic()
        root.apt("install", "--only-upgrade", "branch-agent")
        fig.upgrade_s = time.monotonic() - t0
        installed = root.run("dpkg-query", "-W", "-f", "${Version}", "branch-agent").stdout
        if installed != f"{version}-2":
            raise SystemExit(f"upgraded to {installed!r}, not {version}-2")
        if digest(*kept) != before:
            raise SystemExit("the upgrade changed the keys or the config")
        agent.start()
        broker.start()
        took = until(lambda: set(range(1, upto + 1)) <= set(rx.delivered_ids(GW)), 600,
                     "the events buffered before the upgrade delivered")
        fig.drain_ev_s = fig.buffered / took if took else 0.0
        until(lambda: outbox_held(root) == 0, 600, "the source done and everything delivered")
        agent.stop()
        wire = Counter(rx.delivered_ids(GW))
        twice = [i for i, n in wire.items() if n > 1]
        ids = sorted(wire)
        if twice or ids != list(range(1, len(ids) + 1)):
            raise SystemExit(f"not exactly once: twice {twice[:10]}, missing "
                             f"{sorted(set(range(1, max(ids) + 1)) - set(ids))[:10]}")
        if len(rx.epochs(GW)) != 1:
            raise SystemExit(f"the chain was restarted: {rx.epochs(GW)}")
        fig.delivered = len(ids)

        # --- remove, purge with events unsent, purge after delivery
        broker.stop()
        agent.start()
        until(lambda: undelivered(root, rx) >= 50, 300, "events buffered again")
        agent.stop()
        root.apt("remove", "branch-agent")
        state, etc = root.path / "var/lib/branch-agent", root.path / "etc/branch-agent"
        if (root.path / "opt/branch-agent/bin").exists() or not (
                (state / "outbox.db").exists() and cfg.exists() and kept[0].exists()):
            raise SystemExit("remove did not keep config, keys and outbox (or left the program)")
        purged = root.apt("purge", "branch-agent")
        if not (state / "outbox.db").exists() or "purge kept" not in purged.stdout + purged.stderr:
            raise SystemExit("purge with unsent events did not keep them and say so")
        fig.notes.append("purge with unsent events: kept, " + next(
            (line for line in (purged.stdout + purged.stderr).splitlines()
             if "purge kept" in line), "")[:160])
        root.apt("install", "--no-install-recommends", "branch-agent")
        broker.start()
        agent.start()
        until(lambda: outbox_held(root) == 0, 600, "the last events delivered")
        agent.stop()
        root.apt("purge", "branch-agent")
        left = sorted(p.name for p in state.iterdir()) if state.exists() else []
        if etc.exists() or left not in ([], ["audit"]):
            raise SystemExit(f"purge left {etc if etc.exists() else ''} {left}")
        wire = Counter(rx.delivered_ids(GW))
        if any(n > 1 for n in wire.values()):
            raise SystemExit("an event was delivered twice across remove and reinstall")
        fig.delivered = len(wire)
        fig.notes.append(f"purge after delivery: config and keys gone, state dir {left}")
    finally:
        agent.stop()
        root.umount()
        server.stop()
        rx.close()
        broker.stop()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--mirror", default="http://deb.debian.org/debian")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("make field-test runs as root (chroot, mounts, binfmt_misc)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="field-test-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        fig = field_test(work.resolve(), args.mirror)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join([
        f"field test: arm64 bookworm root under qemu-user-static, "
        f"{time.monotonic() - t0:.0f} s in all",
        f"  installed branch-agent from the signed repository ({fig.package_kb} kB package) "
        f"in {fig.install_s:.0f} s",
        f"  started to READY=1 in {fig.startup_s:.1f} s; peak RSS {fig.peak_rss_mb:.1f} MB "
        "(qemu included)",
        f"  upgraded to the newer build with {fig.buffered} events buffered in "
        f"{fig.upgrade_s:.0f} s",
        f"  delivered {fig.delivered} events exactly once, one chain; the buffered ones at "
        f"{fig.drain_ev_s:.0f} events/s under emulation (from the uplink's return: reconnect "
        "included)",
        "  removed (config, keys, outbox kept) and purged as documented",
    ]))
    for note in fig.notes:
        print(f"  - {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
