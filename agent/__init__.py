"""edgeopt agent: the on-device daemon."""
