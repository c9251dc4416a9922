"""`baton bench throughput` (the offline engine, optionally against Hugging Face `generate` in the same
run) and the request sets the benchmarks share."""
