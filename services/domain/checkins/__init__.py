"""Check-ins: the scan inbox's row, the contract between the CheckIn servers (which
COPY into it) and the ingest workers (which move it into the store)."""
