"""The ground station: ingest, token store, encoder stage, training coordinator."""
