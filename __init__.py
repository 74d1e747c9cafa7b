"""sparsat: simulated satellite-constellation edge learning.

The repository root is this package (pyproject.toml maps `sparsat` to it): sparsat.proto
(the wire contract and its stubs), sparsat.node (models, data, wire, node processes),
sparsat.ground_station, sparsat.sim (scenario, space, mission, deployment, sweeps, the CLI).
Layers: sim -> ground_station -> node -> proto (import-linter contracts in pyproject.toml).
"""
