"""Sensor drivers: GPIO, BLE, serial devices and CoAP ingest. Each turns one kind of hardware
into `Reading`s (agent.core.types) through the seam of `drivers.base`; of the agent they import
only `agent.core` (tests/test_layering.py)."""
