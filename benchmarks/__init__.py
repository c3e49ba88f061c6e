"""CPU (and GPU) benchmarks of the MoR platform: ``python -m benchmarks.run``."""
