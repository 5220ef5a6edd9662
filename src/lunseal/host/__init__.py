"""Host tools: what runs beside a host, talking to the array only over the API and NBD."""
