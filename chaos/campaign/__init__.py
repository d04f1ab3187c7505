"""The real-process chaos campaign (issue 22): resumable streams on a real Redis (a server, a
Sentinel setup, or a local 3+3 cluster) under a seeded fault schedule, checked against the
model after the run.

    python -m chaos.campaign run --topology {server,sentinel,cluster} --duration SECONDS
        --seed N [--processes K] [--report FILE.json] [--keep DIR]

- `_plan`: the seeded plan (streams, readers, SSE sessions, cancels, faults);
- `_run`: the orchestrator (topology, proxies, processes, fault lanes, teardown);
- `_topology`: the Redis topologies and their faults (on `tests/cluster.py`'s harness);
- `worker`, `app`, `client`: the processes (engine workers, uvicorn SSE servers, SSE clients),
  which record what they produce and read (`_records`, `_produce`);
- `_check`: the model check (its docstring states the rules); `__main__`: the report.
"""
