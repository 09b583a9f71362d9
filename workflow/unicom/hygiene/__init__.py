"""Data hygiene: exact URL and content duplicates, semantic near-duplicates, metadata filters."""
