"""Harness: scheduler, memory and protocol layers (not yet built)."""
