"""Loading models, datasets and stored fingerprints."""
