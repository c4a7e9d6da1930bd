"""Helpers shared by the tests, imported by test modules instead of one test module
importing another (conftest.py holds fixtures only):

- `database`, `servers`: the test Postgres and the four servers (in-process, or the
  environment to start one as a process); `fleet`: servers and workers as processes.
- `waits`: waiting on something observable, and a bounded walk through list pages.
- `checkin_helpers`, `venue_helpers`, `exposure_helpers`, `trace_helpers`,
  `accountability_helpers`, `expiry_helpers`: each context's calls and seeded rows.
- `history`: the exactly-once history checker of tests/test_history.py.
"""
