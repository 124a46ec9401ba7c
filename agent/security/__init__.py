"""The gateway's security pieces, used by the runtime and the operator commands: the signing
keys, the tamper-evident audit trail, the processor of signed platform commands, the integrity
manifest of the installed files."""
