"""A simulated GSM modem on a pseudo-terminal, for the modem transport's tests.

Opens a PTY, prints its device path, and answers AT commands on it like a modem in PDU mode:
AT, ATE0/ATE1, AT+CMGF=0, AT+CMGS=<length> (prompt "> ", PDU hex, Ctrl-Z). Every PDU it takes
is appended to a JSON-lines record, with the text as python-gsmmodem-new's decoder reads it.
Knobs the test controls:
  --cms-error K:CODE  answer the K-th PDU with "+CMS ERROR: CODE" (not sent, not recorded)
  --silent-from K     take the K-th PDU and later ones (recorded) but never answer them
  --no-pdu-mode       answer AT+CMGF=0 with ERROR
"""

import argparse
import json
import os
import sys
import tty

from gsmmodem.pdu import decodeSmsPdu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--cms-error", action="append", default=[])
    parser.add_argument("--silent-from", type=int, default=0)
    parser.add_argument("--no-pdu-mode", action="store_true")
    args = parser.parse_args()
    errors = {int(k): int(v) for k, v in (item.split(":") for item in args.cms_error)}

    master, slave = os.openpty()
    tty.setraw(slave)
    print(os.ttyname(slave), flush=True)

    echo = True
    pdus = 0
    buffer = b""
    pending_length = None
    reference = 0

    def send(text):
        os.write(master, text.encode("ascii"))

    while True:
        try:
            data = os.read(master, 1024)
        except OSError:
            # The other side closed the port: wait for the next open.
            continue
        if not data:
            continue
        buffer += data
        while True:
            if pending_length is not None:
                end = min((i for i in (buffer.find(b"\x1a"), buffer.find(b"\x1b")) if i >= 0),
                          default=-1)
                if end < 0:
                    break
                terminator, body = buffer[end:end + 1], buffer[:end]
                buffer = buffer[end + 1:]
                length, pending_length = pending_length, None
                if terminator == b"\x1b":
                    continue
                pdus += 1
                if pdus in errors:
                    send(f"\r\n+CMS ERROR: {errors[pdus]}\r\n")
                    continue
                hex_pdu = body.decode("ascii").strip()
                decoded = decodeSmsPdu(hex_pdu)
                udh = decoded.get("udh") or []
                concat = next((e for e in udh if hasattr(e, "reference")), None)
                entry = {
                    "hex": hex_pdu,
                    "length": length,
                    "number": decoded.get("number"),
                    "text": decoded.get("text"),
                    "reference": getattr(concat, "reference", None),
                    "parts": getattr(concat, "parts", None),
                    "part": getattr(concat, "number", None),
                }
                with open(args.record, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")
                if args.silent_from and pdus >= args.silent_from:
                    continue
                reference = (reference + 1) % 256
                send(f"\r\n+CMGS: {reference}\r\n\r\nOK\r\n")
                continue
            end = buffer.find(b"\r")
            if end < 0:
                break
            line, buffer = buffer[:end].decode("ascii", "replace").strip(), buffer[end + 1:]
            if buffer.startswith(b"\n"):
                buffer = buffer[1:]
            if not line:
                continue
            if echo:
                send(line + "\r")
            upper = line.upper()
            if upper in ("AT", "ATZ", "AT+CMEE=1"):
                send("\r\nOK\r\n")
            elif upper in ("ATE0", "ATE1"):
                echo = upper == "ATE1"
                send("\r\nOK\r\n")
            elif upper == "AT+CMGF=0":
                send("\r\nERROR\r\n" if args.no_pdu_mode else "\r\nOK\r\n")
            elif upper.startswith("AT+CMGS="):
                pending_length = int(upper.split("=", 1)[1])
                send("\r\n> ")
            else:
                send("\r\nERROR\r\n")


if __name__ == "__main__":
    sys.exit(main())
