"""A real SMTP server (aiosmtpd) for tests/alerts.rs: listens on 127.0.0.1:PORT (argv[1]),
accepts every message, and prints one JSON line per message on stdout:
{"mail_from", "rcpt_tos", "data"}. Prints "READY" once it listens; stops on stdin EOF."""

import json
import sys

from aiosmtpd.controller import Controller


class Sink:
    async def handle_DATA(self, server, session, envelope):
        print(
            json.dumps(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "data": envelope.content.decode("utf-8", "replace"),
                }
            ),
            flush=True,
        )
        return "250 Message accepted for delivery"


controller = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("READY", flush=True)
sys.stdin.read()
controller.stop()
