"""`microserve bench`: datasets (workloads), loadgen (the async client), metrics (vLLM-compatible
results). The submodules are imported explicitly; this package imports nothing heavy."""
