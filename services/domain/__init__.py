"""The domain floor: one package per bounded context, holding the rules that a server
and a worker both apply. Servers and workers import it; it imports only the kernel."""
