"""Data and masks: datasets, shards, clouds and masks, and the sensor's configuration."""
