"""A venue scanner device through the device SDK: record scans, stream them, show answers.

    QR codes read at the door -> ScanBuffer (durable, numbered) -> DeviceClient -> acks

With `./dev up` running and a registered device whose certificate and key are in the
PKI directory as `<device>.pem` and `<device>.key` (RegisterDevice returns them):

    ./dev python docs/examples/scanner_device.py --device DEVICE_ID --token TOKEN ...

Each `--token` is the text of a person's QR code, as the camera reads it. Every scan
is written to the buffer (`--buffer`, a SQLite file) before anything is sent and
leaves it only with its answer, so running the example again after a failure, with
no `--token`, resends what was never answered. One line per answer: the scan's
sequence number and the door's decision (a DENIED scan shows the decision id the
person can appeal with). Exit status: 0 when every scan was admitted or denied, 1
when one was rejected or the device was refused. Synthetic data only.

It needs nothing but the stopcovid-client distribution: tests/test_client_distribution.py
runs it from an environment that holds that wheel and its dependencies alone.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys

from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client import BatchAck, ClientConfig, DeviceClient, ScanBuffer, StopCovidError
from stopcovid.common.v1 import common_pb2

DECIDED = {pb.SCAN_OUTCOME_ADMITTED, pb.SCAN_OUTCOME_DENIED}


def describe(result: pb.ScanResult) -> str:
    line = f"scan {result.sequence}: {pb.ScanOutcome.Name(result.outcome)}"
    if result.outcome == pb.SCAN_OUTCOME_REJECTED:
        line += f" ({pb.ScanRejectReason.Name(result.reject_reason)})"
    if result.decision_id:
        line += f" decision {result.decision_id}"
    return line


async def run(args: argparse.Namespace) -> int:
    config = ClientConfig.from_pki_dir(args.checkin, args.pki_dir, args.device)
    undecided = 0

    def show(ack: BatchAck) -> None:
        nonlocal undecided
        for result in ack.results:
            print(describe(result), flush=True)
            undecided += result.outcome not in DECIDED

    with ScanBuffer(args.buffer) as buffer:
        async with DeviceClient(config, buffer, on_ack=show) as device:
            # Durable before it returns: a crash from here on loses no scan.
            now = dt.datetime.now(dt.UTC)
            device.scan_many((token, now, common_pb2.SCAN_DIRECTION_ENTRY) for token in args.token)
            async with asyncio.timeout(args.timeout):
                await device.drain()
            stats = device.stats
    print(f"answered: {stats.acked} scans in {stats.batches_acked} batches")
    return 0 if undecided == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--checkin", default="localhost:50051", help="CheckIn server")
    parser.add_argument("--pki-dir", default=".stopcovid/pki", help="certificates")
    parser.add_argument("--device", required=True, help="the device's certificate stem")
    parser.add_argument("--buffer", default="scans.db", help="the scan buffer (SQLite)")
    parser.add_argument("--token", action="append", default=[], help="a scanned QR code")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except StopCovidError as err:
        # DEVICE_REVOKED, an unknown certificate, ...: retrying cannot help.
        print(f"refused: {type(err).__name__} {err.reason}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("not every scan was answered in time; run again to resend", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
