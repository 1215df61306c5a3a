"""Loading models, datasets and stored fingerprints, and what counts as a user's mistake about them (errors.py)."""
