"""edgeopt SDK: contracts (profiles, packages, topics, payloads) and the host-side packaging pipeline."""

__version__ = "0.1.0"
