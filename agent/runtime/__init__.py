"""What runs on the gateway 24/7: the composition root (`root.Runtime`), the pipeline, the
forwarder and the service manager's protocol (sd_notify). Above the protocol, the outbox, the
uplinks, the security pieces and the drivers; below the operator commands."""
