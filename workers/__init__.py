"""Data plane: owns weights, KV caches and forward passes."""
