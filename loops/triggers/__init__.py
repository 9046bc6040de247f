"""Trigger kinds of a loop: one module each, found by name in a registry."""
