"""Places: Cambodia's provinces."""
