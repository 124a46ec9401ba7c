"""The reference platform: verifies, deduplicates and acknowledges the gateway's batches.

Transport-free core (`Receiver`) plus an MQTT front end; the CoAP front end calls the same
`Receiver.handle_batch`.
"""

from branchsim.platform.receiver import Receiver

__all__ = ["Receiver"]
