"""Check-ins: the scan inbox's row, the contract between the CheckIn servers (which
COPY into it) and the ingest workers (which move it into the store), and the
ingest steps themselves (moving a batch, preparing the days ahead)."""
