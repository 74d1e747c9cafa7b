"""Deployment: starting nodes as processes, certificates, node entry points."""
