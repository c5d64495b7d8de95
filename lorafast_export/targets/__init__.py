"""Targets: one module per runtime, each registering itself in `registry` (see targets/registry.py)."""

from lorafast_export.targets.registry import TARGETS, get_target, register

__all__ = ["TARGETS", "get_target", "register"]
