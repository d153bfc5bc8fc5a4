"""Framewise gateway and command line."""
