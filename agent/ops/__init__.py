"""What an installer runs (`branch-agent …`): the command line, provisioning and renewal,
doctor, status, the metrics exporter. Above everything else; nothing imports it. Commands that
must start fast (status, check-config, audit verify, config show) import neither paho nor
cryptography (tests/test_layering.py)."""
