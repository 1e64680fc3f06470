"""Training loops for learned masks and sparse training; backends decide how ranks share the work."""
