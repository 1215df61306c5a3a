"""Model lineage: weights -> fingerprint profiles -> distance, families, store."""
