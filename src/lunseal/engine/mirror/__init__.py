"""Mirrors: legs, the synchronous fan-out, split/resync/restore and their persistence."""
