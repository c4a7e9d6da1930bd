"""Retention: the expiry run, shared by RunExpiry and the workers' schedule."""
