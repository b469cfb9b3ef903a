"""The CPU kernel library (attention and model ops in C++), built once per machine and cached:
`microserve.kernels.build.kernel_error()` builds or loads it."""
