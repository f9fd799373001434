"""Load generation, the mock delivery target and microbenchmarks."""
