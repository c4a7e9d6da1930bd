"""Helpers shared by the tests: not tests themselves, and imported by test modules
instead of one test module importing another."""
