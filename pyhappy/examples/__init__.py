"""Runnable examples: python -m pyhappy.examples.<name>."""
