"""`python -m services.ops.probe`: is a server SERVING, by the standard gRPC health
service over mutual TLS? Exit 0 when it is, 1 otherwise: what a Kubernetes exec
readiness probe runs (Kubernetes' own gRPC probe cannot present a client
certificate, and every call here, health checks included, needs one).

    python -m services.ops.probe --port 50051 --service stopcovid.checkin.v1.CheckInService \\
        --ca /etc/stopcovid/tls/ca.pem --cert /etc/stopcovid/probe/tls.crt \\
        --key /etc/stopcovid/probe/tls.key

The probe's certificate is a staff certificate of any role (health checks accept
every role); it prints one line saying why it failed, never a certificate's content.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def check(target: str, service: str, *, ca: Path, cert: Path, key: Path, timeout: float) -> str:
    """'' when `service` at `target` is SERVING; else what it is, or what failed."""
    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(target, creds) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"health check failed: {code.name if code else type(exc).__name__}"
    if status != SERVING:
        return f"not serving: {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.ops.probe", description=__doc__)
    parser.add_argument("--host", default="localhost", help="the name in the server certificate")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="a service's full name; '' the server")
    parser.add_argument("--ca", type=Path, required=True, help="the platform's root CA")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        problem = check(
            f"{args.host}:{args.port}",
            args.service,
            ca=args.ca,
            cert=args.cert,
            key=args.key,
            timeout=args.timeout,
        )
    except OSError as exc:
        problem = f"cannot read the probe's credentials: {type(exc).__name__}"
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
