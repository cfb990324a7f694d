"""What both ends of the federation speak: the message protocol, the federated statistics, the PKI checks,
the app bundle's identity and the helpers that start Flower's processes. Imports neither client nor server."""
