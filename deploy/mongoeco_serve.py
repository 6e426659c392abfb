"""Serve a mongoeco database over the MongoDB wire protocol, for the test-suite.

Binds: a TCP listener on --host:--port that pymongo talks to as if it were mongod.
Storage: one SQLite file (--db), so data survives a stop and a start on the same path.

mongoeco needs Python >= 3.13, so this runs from its own venv (.cache/mongoeco-venv), made by
`deploy/test-servers.sh install`:

    .cache/mongoeco-venv/bin/python deploy/mongoeco_serve.py --host 127.0.0.1 --port 27018 --db /tmp/m.sqlite

SIGTERM or SIGINT closes the listener and the SQLite engine cleanly, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from mongoeco.engines.sqlite import SQLiteEngine
from mongoeco.wire.proxy import AsyncMongoEcoProxyServer

log = logging.getLogger("mongoeco_serve")


async def serve(host: str, port: int, db_path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    server = AsyncMongoEcoProxyServer(engine=SQLiteEngine(db_path), host=host, port=port)
    address = await server.start()
    # The fixture waits for a ping, not for this line; it is here for the log.
    log.info("listening on %s (db %s)", address.uri, db_path)
    try:
        await stop.wait()
    finally:
        await server.close()
        log.info("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="SQLite file that holds the data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(args.host, args.port, args.db))


if __name__ == "__main__":
    main()
