"""Flower ClientApp and `cmoe-client` (thin glue over `cancermoe`)."""
