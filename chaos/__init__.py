"""Systematic searches for faults in resumable_stream.

`chaos.sim` is the seeded deterministic simulator: the engine runs on a simulated Redis that
injects faults under one seed, on virtual time, and every run is checked against the model
(`python -m chaos.sim run --seeds N`, `python -m chaos.sim replay SEED`).

`chaos.campaign` is the real-process campaign: worker processes, uvicorn SSE servers and SSE
clients on a real Redis (a server, Sentinel, or a local 3+3 cluster) under a seeded schedule of
Redis-level and process-level faults, every reader checked against its producer's recorded text
after the run (`python -m chaos.campaign run --topology T --duration S --seed N`).
"""
