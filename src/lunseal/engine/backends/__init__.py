"""Backends: where a LUN's bytes live (sparse file, memory) and the layers stacked on them."""
