"""One widget per module; each takes a snapshot and shows its part of it."""
