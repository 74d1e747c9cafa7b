"""Space: orbits, contact-window search, link budgets and links on the SimPy clock."""
