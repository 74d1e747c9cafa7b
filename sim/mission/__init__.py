"""Mission control: the satellites on the clock, training, the tally, resume state, the
ground-station client, the sensor hosts, and results.json."""
