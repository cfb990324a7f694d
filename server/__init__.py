"""Flower ServerApp, aggregation, tracking and `cmoe-server`."""
