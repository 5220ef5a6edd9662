"""Host-side backup and restore (docs/design.md section 5).

Everything here talks to the array only through the management API
(:class:`lunseal.host.client.ArrayClient`) and NBD (:class:`lunseal.host.nbd_client.NbdClient`),
so it works from another machine exactly as from the array's own.
"""
