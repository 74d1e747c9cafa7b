"""Mission control: scenarios, contact windows, SimPy links, the local launcher, the CLI."""
