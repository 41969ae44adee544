"""Optional parts a host project may mount."""
