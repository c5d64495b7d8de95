"""Targets: one package per runtime; each package's target.py registers itself in `registry`.
What a target declares as data (name, limits) is in specs.py."""
