"""Systematic searches for faults in resumable_stream.

`chaos.sim` is the seeded deterministic simulator: the engine runs on a simulated Redis that
injects faults under one seed, on virtual time, and every run is checked against the model
(`python -m chaos.sim run --seeds N`, `python -m chaos.sim replay SEED`).
"""
