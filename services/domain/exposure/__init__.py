"""Exposure: access grants, the trace and its risk rules, risk status."""
