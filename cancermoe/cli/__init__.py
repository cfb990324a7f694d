"""Command-line entry points of the science package (`cmoe-bank`, `cmoe-train`)."""
