"""The scenario: its schema (YAML), and the node configurations derived from it."""
