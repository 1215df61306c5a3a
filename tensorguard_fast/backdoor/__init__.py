"""Backdoor sample filtering: per-sample lm_head gradient spectra and sketches -> scores -> decision -> scan."""
