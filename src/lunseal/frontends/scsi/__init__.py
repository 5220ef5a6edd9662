"""The SCSI command set (SPC-4 / SBC-3) of a lunseal LUN, independent of transport.

A transport (iSCSI today) collects a command's CDB and data-out, runs
:meth:`ScsiTarget.execute` on the LUN's worker and sends back the status, the
data-in and the sense data.  Everything here is sans-I/O.
"""
