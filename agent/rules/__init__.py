"""Branch security rules at the edge (docs/RULES.md): when the branch is armed (`arming`), and
rules that need memory and time (`stateful`: held-open, silence, sequences). Pure: time is passed
in, so every rule is unit-tested with plain numbers; agent.runtime runs them."""
