"""Other libraries' steps that `jaxft bench --compare` times beside jaxft's, on the same model
and batch: `bench_torch` (Hugging Face transformers + PyTorch) and `bench_tunix` (Tunix). They
are comparisons, not part of the library: like the recipes under configs/, they live in a source
checkout, and `jaxft.perf.bench` loads them from here."""
