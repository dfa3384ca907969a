"""Clients of the Parley service."""
