"""Experiments: plans from user input (plans.py), experiment configs and prompt suites (configs.py), the demo.

Imports nothing heavy: the CLI validates every argument through this package before torch loads.
"""
