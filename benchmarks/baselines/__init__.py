"""Re-implementations of other code, kept as speed baselines for the benchmarks."""
