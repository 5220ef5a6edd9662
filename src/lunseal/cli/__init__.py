"""The ``lunseal`` command line."""
