"""The kernel: what every process needs (configuration, database, errors, logging,
the interceptor and server runner, auth, audit, keys, validation, pagination)."""
