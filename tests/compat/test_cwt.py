"""cwt, an independent COSE implementation, agrees with our COSE_Sign1 messages: the published
batch and command vectors, and a renewal request made by `provision --renew`.

cwt 3.3 requires cbor2 < 6 while the runtime lock has cbor2 6, so these run in their own
environment (.venv-compat, `make test-compat`, which `make test` runs)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zstandard

cwt = pytest.importorskip("cwt", reason="cwt runs in .venv-compat: make test-compat")

from agent.protocol import kid_for  # noqa: E402 (after the skip: cwt decides the module)
from agent.security.keys import load_public_key  # noqa: E402
from tests.support.agentproc import AGENT  # noqa: E402
from tests.support.pki import Pki  # noqa: E402
from tests.test_lifecycle import GW, gateway  # noqa: E402

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
EXPECTED: dict[str, Any] = json.loads((VECTORS / "expected.json").read_text())
COMMANDS = VECTORS / "commands"


def test_batch_vectors() -> None:
    """cwt verifies the good batch vectors with the published fields and events, and rejects
    the tampered ones."""
    pem = (VECTORS / EXPECTED["public_key"]).read_bytes()
    key = cwt.COSEKey.from_pem(pem, kid=bytes.fromhex(EXPECTED["kid"]))
    cose = cwt.COSE.new()
    checked = 0
    for case in EXPECTED["batches"]:
        data = (VECTORS / case["file"]).read_bytes()
        if case["result"] == "ok":
            raw = cose.decode(data, key)  # the signature covers the payload as sent
            if case.get("content_type") == "application/zstd":
                raw = zstandard.ZstdDecompressor().decompress(raw)
            payload = cbor2.loads(raw)
            assert payload["seq"] == case["seq"] and payload["gw"] == EXPECTED["gw"]
            assert payload.get("epoch", b"").hex() == case.get("epoch", "")
            assert payload.get("lane", 0) == case.get("lane", 0)
            assert payload["events"] == case["events"]
            checked += 1
        elif case["result"] == "bad-signature":
            with pytest.raises(Exception, match=r"(?i)verify"):
                cose.decode(data, key)
        elif case["result"] == "malformed" and case.get("lane") == 1:
            # signed, but breaks the alarm lane's rule (docs/PROTOCOL.md 3.2): not only alarms
            payload = cbor2.loads(cose.decode(data, key))
            assert payload["lane"] == 1 and payload["events"] == case["events"]
            assert any(ev["prio"] != 0 for ev in payload["events"])
    assert checked >= 6


def test_command_vectors() -> None:
    """cwt verifies a good command and refuses the one with a bad signature."""
    pub = load_public_key(COMMANDS / "platform-test.pub")
    key = cwt.COSEKey.from_pem((COMMANDS / "platform-test.pub").read_bytes(), kid=kid_for(pub))
    payload = cbor2.loads(cwt.COSE.new().decode((COMMANDS / "01-ping.cose").read_bytes(), key))
    expected = json.loads((COMMANDS / "expected.json").read_text())
    assert (payload["cmd"], payload["seq"], payload["gw"]) == ("ping", 1, expected["gw"])
    with pytest.raises(Exception, match=r"(?i)verif|sign"):
        cwt.COSE.new().decode((COMMANDS / "07-bad-signature.cose").read_bytes(), key)


def test_renewal_request(tmp_path: Path, pki: Pki) -> None:
    """The signing-key authentication that `provision --renew` writes beside the CSR verifies
    with cwt under the gateway's registered key and names the gateway."""
    gw = gateway(tmp_path / "gw", pki)
    res = subprocess.run([*AGENT, "provision", "--renew", "--config", str(gw.config_path)],
                         capture_output=True, text=True, timeout=60, check=False,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    auth = (gw.dir / "tls" / "next" / "client.csr.cose").read_bytes()
    key = cwt.COSEKey.from_pem(gw.pubkey.read_bytes(), kid=kid_for(load_public_key(gw.pubkey)))
    claims = cbor2.loads(cwt.COSE.new().decode(auth, key))
    assert (claims["type"], claims["gw"]) == ("mqtt-csr-renewal", GW)
