"""Datasets vendored with the package (see each folder README for attribution)."""
