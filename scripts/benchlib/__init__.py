"""Machinery of scripts/bench.py: workload building, targets, steps, report (stdlib only)."""
