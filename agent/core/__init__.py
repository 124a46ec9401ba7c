"""The agent's vocabulary, below everything else: it imports nothing from agent/, drivers/ or
the simulator (tests/test_layering.py checks it), so drivers may use it too."""
