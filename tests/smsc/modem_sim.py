"""A simulated GSM modem on a pseudo-terminal, for the modem transport's tests.

Opens a PTY, prints its device path, and answers AT commands on it like a modem in PDU mode:
AT, ATE0/ATE1, AT+CMGF=0, AT+CMGS=<length> (prompt "> ", PDU hex, Ctrl-Z), and for received
messages AT+CMGL=4 (list all, PDU mode) and AT+CMGD=<index> (delete). Every PDU it takes is
appended to a JSON-lines record, with the text as python-gsmmodem-new's decoder reads it.
A line "<from> <text>" on stdin is a message a phone sent to the modem: it is stored as an
SMS-DELIVER PDU (GSM 7-bit, encoded with python-gsmmodem-new) until it is listed and deleted.
Knobs the test controls:
  --cms-error K:CODE  answer the K-th PDU with "+CMS ERROR: CODE" (not sent, not recorded)
  --silent-from K     take the K-th PDU and later ones (recorded) but never answer them
  --no-pdu-mode       answer AT+CMGF=0 with ERROR
"""

import argparse
import json
import os
import select
import sys
import tty

from gsmmodem.pdu import decodeSmsPdu, encodeGsm7, packSeptets


def deliver_pdu(sender, text):
    """An SMS-DELIVER PDU (no SMSC part) from `sender` with a GSM 7-bit `text`."""
    digits = sender.lstrip("+")
    toa = 0x91 if sender.startswith("+") else 0x81
    padded = digits + ("F" if len(digits) % 2 else "")
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    septets = encodeGsm7(text)
    return ("00" + "04" + f"{len(digits):02X}{toa:02X}" + swapped + "00" + "00"
            + "62120621000000" + f"{len(septets):02X}" + packSeptets(septets).hex().upper())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", required=True)
    parser.add_argument("--cms-error", action="append", default=[])
    parser.add_argument("--silent-from", type=int, default=0)
    parser.add_argument("--no-pdu-mode", action="store_true")
    args = parser.parse_args()
    errors = {int(k): int(v) for k, v in (item.split(":") for item in args.cms_error)}

    stored = {}
    next_index = 1
    stdin_open = True

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
        readable, _, _ = select.select([master] + ([sys.stdin] if stdin_open else []), [], [])
        if sys.stdin in readable:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
            elif line.strip():
                sender, _, text = line.rstrip("\n").partition(" ")
                stored[next_index] = deliver_pdu(sender, text)
                next_index += 1
            continue
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
            elif upper == "AT+CMGL=4":
                for index, pdu in sorted(stored.items()):
                    send(f"\r\n+CMGL: {index},0,,{len(pdu) // 2 - 1}\r\n{pdu}")
                send("\r\n\r\nOK\r\n")
            elif upper.startswith("AT+CMGD="):
                stored.pop(int(upper.split("=", 1)[1]), None)
                send("\r\nOK\r\n")
            elif upper.startswith("AT+CMGS="):
                pending_length = int(upper.split("=", 1)[1])
                send("\r\n> ")
            else:
                send("\r\nERROR\r\n")


if __name__ == "__main__":
    sys.exit(main())
