"""An iSCSI target (RFC 7143) serving the array's LUNs: a sans-I/O PDU codec,
login and session state machines, and a thin asyncio shell."""
