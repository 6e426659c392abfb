"""The design most tutorials teach, written as they teach it: a thread per connection, one write per reading.

    python benchmarks/baseline_threaded.py PORT INFLUX_URL MEASUREMENT

``socketserver.ThreadingTCPServer`` (default listen backlog), a line-reading loop per connection, and
for every JSON line one synchronous ``write_api.write`` through the official influxdb-client, with the
device as a tag and the device's timestamp. No batching, no buffering, no retries beyond the client's
own: this is the baseline the benchmark compares against, not a design to copy.
"""
from __future__ import annotations

import json
import socketserver
import sys

from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS


def main(port: int, url: str, measurement: str) -> None:
    client = InfluxDBClient(url=url, token="benchmark", org="sensorpipe")
    write_api = client.write_api(write_options=SYNCHRONOUS)

    class Device(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                reading = json.loads(line)
                point = (Point(measurement)
                         .tag("device", reading["device"])
                         .field("temp", reading["temp"])
                         .field("humi", reading["humi"])
                         .field("rssi", reading["rssi"])
                         .time(reading["ts"], WritePrecision.MS))
                write_api.write(bucket="sensors", record=point)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Device) as server:
        server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
