"""Submissions: formats, deterministic zips and their JSON sidecar, packing the test predictions."""
