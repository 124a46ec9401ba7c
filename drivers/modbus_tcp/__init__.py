"""Modbus TCP devices (`[[sources.modbus_tcp]]`): meters, PLCs and TCP-to-RTU gateways on the
branch LAN, polled with the same register maps as the Modbus RTU devices.

- `config`: the config model (light: loading a config imports no pymodbus);
- `source`: the poller the runtime runs, and the doctor's reachability check.
"""
