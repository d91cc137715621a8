"""fatscale's GPU checks: python -m benchmarks.gpu --out DIR (benchmarks/gpu/README.md)."""
