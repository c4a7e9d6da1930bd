"""Exposure: access grants, the trace and its risk rules, the trace job and the rows
it writes, the notification outbox and its messages, risk status."""
