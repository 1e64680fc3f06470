"""Run drivers: what a CLI command does, from a validated config to an output folder."""
