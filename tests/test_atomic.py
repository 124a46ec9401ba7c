"""Every small file the agent keeps is written whole or not at all and survives a power cut once
its write returned: the command replay guard, the pseudonym key, the chain position, the keys.
Checked on the real system calls of a real process (strace), replayed against a model of what
a cut keeps (tests/support/powercut.py) at every point of the write and right after it."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from tests.support.powercut import cut_after, traced


def survives_cuts(code: str, dir: Path, name: str) -> list[str]:
    """Run `code` (Python, `dir` bound as D) under strace; assert that a cut at any point never
    leaves `name` torn, and that after the code returned a cut keeps the new `name`. Returns
    the trace."""
    before = sorted(os.listdir(dir))
    os.sync()  # what was there before is on disk, as the model assumes
    trace = traced(f"from pathlib import Path\nD = Path({str(dir)!r})\n" + textwrap.dedent(code),
                   dir)
    assert trace, "the code touched nothing in the directory"
    for i in range(len(trace) + 1):
        left = cut_after(trace[:i], dir, before, names="eager").get(name)
        assert left in (None, "before", "new"), f"torn by a cut after: {trace[i - 1]}"
    assert cut_after(trace, dir, before, names="lazy").get(name) == "new", (
        "a cut after the write returned brings back the old file (no directory fsync?)")
    return trace


def test_command_replay_guard_survives_a_power_cut(tmp_path: Path) -> None:
    """SeqStore.accept returns only when the new last_seq would survive a cut: a replayed
    command cannot get through after the power comes back."""
    from agent.security.commands import SeqStore

    SeqStore(tmp_path / "cmd-seq.json").accept(5, b"\x05" * 32)
    survives_cuts("""
        from agent.security.commands import SeqStore
        SeqStore(D / "cmd-seq.json").accept(6, b"\\x06" * 32)
    """, tmp_path, "cmd-seq.json")
    assert SeqStore(tmp_path / "cmd-seq.json").last_seq == 6


def test_pseudonym_key_is_created_whole(tmp_path: Path) -> None:
    """A cut while the pseudonym key is created leaves no key or the whole key, never an empty
    file (which an older version then used as the HMAC key for ever)."""
    survives_cuts("""
        from agent.security.pseudonym import load_pseudonym_key
        assert len(load_pseudonym_key(D)) == 32
    """, tmp_path, "pseudonym.key")


def test_an_empty_pseudonym_key_is_replaced(tmp_path: Path) -> None:
    """A key file left empty (or short) by an older version is not used: a new key is made."""
    from agent.security.pseudonym import load_pseudonym_key

    (tmp_path / "pseudonym.key").write_bytes(b"")
    key = load_pseudonym_key(tmp_path)
    assert len(key) == 32 and (tmp_path / "pseudonym.key").read_bytes() == key
    assert load_pseudonym_key(tmp_path) == key  # and it stays


def test_chain_position_survives_a_power_cut(tmp_path: Path) -> None:
    """The outbox's side state (id floor, acknowledged chain head) is rewritten atomically."""
    from agent.outbox.side import SideState

    SideState(tmp_path).update(floor=1)
    survives_cuts("""
        from agent.outbox.side import SideState
        SideState(D).update(floor=2_000_000, seq=7)
    """, tmp_path, "chain.json")


@pytest.mark.parametrize("name", ["signing.key", "signing.pub"])
def test_keys_are_created_whole(tmp_path: Path, name: str) -> None:
    """keygen's files appear whole or not at all, and stay after keygen returned."""
    survives_cuts("""
        from agent.security.keys import generate_keypair
        generate_keypair(D)
    """, tmp_path, name)


def test_the_model_sees_what_the_old_writers_did_wrong(tmp_path: Path) -> None:
    """The checks above can fail: a write in place is torn by a cut, and a rename without a
    directory fsync is not durable."""
    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(AssertionError, match="torn"):
        survives_cuts("""
            import os
            fd = os.open(D / "a", os.O_WRONLY | os.O_TRUNC)
            os.write(fd, b"new"); os.fsync(fd); os.close(fd)
        """, tmp_path, "a")
    with pytest.raises(AssertionError, match="no directory fsync"):
        survives_cuts("""
            import os
            fd = os.open(D / "b.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, b"new"); os.fsync(fd); os.close(fd)
            os.replace(D / "b.tmp", D / "a")
        """, tmp_path, "a")
