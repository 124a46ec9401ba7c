"""CoAP ingest (`[sources.coap]`): IP sensors on the branch LAN post SenML to the gateway.

- `config`: the config models (light: loading a config imports no aiocoap);
- `senml`: the pure SenML decoder and resolver;
- `server`: the aiocoap endpoint and the source the runtime runs.
"""
