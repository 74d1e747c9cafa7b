"""Node processes: the sensor host and the trainer servers, and re-registration."""
