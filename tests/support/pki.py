"""The test PKI lives in the simulator (the demo uses it too); re-exported for the tests."""

from branchsim.pki import Pki, make_pki

__all__ = ["Pki", "make_pki"]
