"""lunseal: a software disk array with trustworthy LUN state tokens."""

__version__ = "0.1.0"
