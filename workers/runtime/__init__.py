"""The worker runtime: what every job of the worker pool runs on.

- `loop`: the one claim-run-back-off loop (`ClaimLoop`) that ingest, traces, the
  notification outbox, scheduled expiry, the days ahead and the heartbeat all run
  in; `Backoff`; `Periodic` (work due on a schedule, as a job of the same loop);
  `Shutdown` (one cancel scope over the process's tasks, with a grace period for
  the batches in flight).
- `wakeups`: an event per NOTIFY channel, set by the LISTEN task, waited on by the
  idle loops.
- `listen`: the one LISTEN connection of a process, for all its channels.

Transient database errors and how to log them are the kernel's
(`services.kernel.db.TRANSIENT_ERRORS`, `error_fields`): the servers share them.
`loop` and `wakeups` are plain trio; only `listen` crosses to asyncio (asyncpg),
so the loop's logic runs, and is tested, under trio's virtual clock.
"""
