"""A slow SMTP receiver for the kill -9 test: it writes each message to a
file as soon as the final dot arrives, then waits before answering 250, so
a client that dies in between leaves a message that was received but never
confirmed (the RFC 1047 window).

With --stall-first-rcpt SECONDS the first RCPT the receiver ever gets is
answered only after that long (later ones at once), and "rcpt-stalled" is
printed when it arrives: a client killed then had not reached DATA, so
nothing of that transaction can have been delivered.

usage: slowsink.py HOST PORT DUMPDIR DELAY_SECONDS [--stall-first-rcpt SECONDS]
"""
import asyncio
import os
import sys
import uuid

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, dumpdir, delay, stall_rcpt):
        self.dumpdir = dumpdir
        self.delay = delay
        self.stall_rcpt = stall_rcpt

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.stall_rcpt > 0:
            stall, self.stall_rcpt = self.stall_rcpt, 0
            print("rcpt-stalled", flush=True)
            await asyncio.sleep(stall)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        path = os.path.join(self.dumpdir, uuid.uuid4().hex)
        with open(path, "wb") as f:
            f.write(envelope.original_content or envelope.content)
        await asyncio.sleep(self.delay)
        return "250 2.0.0 stored"


def main():
    args = sys.argv[1:]
    stall = 0.0
    if "--stall-first-rcpt" in args:
        i = args.index("--stall-first-rcpt")
        stall = float(args[i + 1])
        del args[i:i + 2]
    host, port, dumpdir, delay = args[0], int(args[1]), args[2], float(args[3])
    ctl = Controller(Handler(dumpdir, delay, stall), hostname=host, port=port,
                     server_hostname="slowsink.test")
    ctl.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the test closes our stdin or kills us
    finally:
        ctl.stop()


if __name__ == "__main__":
    main()
