"""Performance tools: `jaxft plan` (per-chip memory and step time on a TPU pod, compiled ahead
of time here: `plan`) and `jaxft bench` (step throughput side by side: `bench`, what it runs:
`bench_setup`; the PyTorch and Tunix steps it compares with live outside the package, in
benchmarks/ of a source checkout)."""
