"""GPIO (`[sources.gpio]`): door and vault contacts, motion, panic buttons, tamper loops, and the
status LED and pulse outputs.

- `config`: the config models (light: loading a config imports no gpiozero);
- `source`: the driver, on gpiozero with an injected pin factory.
"""
