"""A slow SMTP receiver for the kill -9 test: it writes each message to a
file as soon as the final dot arrives, then waits before answering 250, so
a client that dies in between leaves a message that was received but never
confirmed (the RFC 1047 window).

usage: slowsink.py HOST PORT DUMPDIR DELAY_SECONDS
"""
import asyncio
import os
import sys
import uuid

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, dumpdir, delay):
        self.dumpdir = dumpdir
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(self.dumpdir, uuid.uuid4().hex)
        with open(path, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        await asyncio.sleep(self.delay)
        return "250 2.0.0 stored"


def main():
    host, port, dumpdir, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    ctl = Controller(Handler(dumpdir, delay), hostname=host, port=port,
                     server_hostname="slowsink.test")
    ctl.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the test closes our stdin or kills us
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
