"""Retention: the data classes and their periods, one expiry run (expiry_run.py, its
public face, and a module per class's step), shared by RunExpiry and the workers'
schedule; and the audit action names of retention work."""
