"""The project's small iSCSI initiator (host side)."""
