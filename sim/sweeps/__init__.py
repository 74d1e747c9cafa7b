"""Experiments: sweep specs, their runner and reports, the Ray executor."""
