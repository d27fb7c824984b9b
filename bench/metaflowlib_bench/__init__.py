"""The benchmark harness (issue 8): our methods against the peer libraries and a minimal loop (issue 16: the
same step with nothing around it, `minimal.py`), same data, device and run.

Measures meta-training throughput after warm-up, adaptation latency, evaluation
throughput, peak memory and time to accuracy; `python -m metaflowlib_bench`
(or `metaflowlib-bench`) runs it. Imports torch and numpy only (plus the peers,
when installed), so it runs on a bare GPU machine.
"""
