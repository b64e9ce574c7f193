"""Pulling images from OCI distribution registries."""
