"""Benchmarks of fused_optim; ``python -m benchmarks`` runs the main report."""
