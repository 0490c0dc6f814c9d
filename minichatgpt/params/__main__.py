"""``python -m minichatgpt.params [PRESET] [--out params.yaml]``: write params.yaml."""

from minichatgpt.params.presets import main

main()
