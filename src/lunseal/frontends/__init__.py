"""Front ends: wire protocols (NBD, the management API) translated into engine calls."""
