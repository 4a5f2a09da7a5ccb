#!/usr/bin/env python3
"""Independent cross-check of tidings-sms against python-gsmmodem-new.

Driven by tests/gsmmodem_crosscheck.rs, which runs this script with
python3 and compares the answers with the Rust implementation. It uses
the functions of gsmmodem.pdu only; no modem or serial port is touched.

Reads one JSON request on standard input (ASCII, non-ASCII as \\u escapes):

    {"decode": [{"name": str, "pdus": [hex, ...]}, ...],
     "encode": [{"name": str, "number": str, "text": str,
                 "validity_minutes": int or null}, ...]}

and writes one JSON reply on standard output:

    {"decoded": [{"name": str, "parts": [part, ...]} or {"name", "error"}],
     "encoded": [{"name": str, "pdus": [{"hex", "tpdu_length"}]}
                 or {"name", "error"}]}

where a decoded part is {"number", "text", "udh", "tpdu_length",
"validity_seconds"} and "udh" lists {"iei", "data"} plus "reference",
"parts" and "number" for concatenation elements.

Exits with status 3 and a message on standard error if gsmmodem is not
installed, so that the Rust test fails with a clear instruction.
"""

import json
import sys
from datetime import timedelta

try:
    from gsmmodem.pdu import Concatenation, decodeSmsPdu, encodeSmsSubmitPdu
except ImportError as error:
    sys.stderr.write(
        "gsmmodem.pdu could not be imported by %s: %s\n"
        "Install the independent implementation with: pip install python-gsmmodem-new\n"
        % (sys.executable, error)
    )
    sys.exit(3)


def join_surrogates(text):
    """gsmmodem decodes UCS-2 one 16-bit unit at a time, so an emoji comes
    back as two lone surrogates; re-pair them so the text compares equal.
    A really unpaired surrogate (an emoji split across parts) raises."""
    return text.encode("utf-16-be", "surrogatepass").decode("utf-16-be")


def describe_udh(elements):
    out = []
    for ie in elements or []:
        entry = {"iei": ie.id, "data": list(ie.data)}
        if isinstance(ie, Concatenation):
            entry.update(reference=ie.reference, parts=ie.parts, number=ie.number)
        out.append(entry)
    return out


def decode(item):
    parts = []
    for hex_pdu in item["pdus"]:
        pdu = decodeSmsPdu(hex_pdu)
        validity = pdu.get("validity")
        parts.append(
            {
                "number": pdu.get("number"),
                "text": join_surrogates(pdu.get("text", "")),
                "udh": describe_udh(pdu.get("udh")),
                "tpdu_length": pdu.get("tpdu_length"),
                "validity_seconds": None
                if validity is None
                else int(validity.total_seconds()),
            }
        )
    return {"name": item["name"], "parts": parts}


def encode(item):
    minutes = item.get("validity_minutes")
    pdus = encodeSmsSubmitPdu(
        item["number"],
        item["text"],
        # Both sides use reference 0 (TP-MR and concatenation reference)
        # and no status report, so that the bytes are comparable.
        reference=0,
        validity=None if minutes is None else timedelta(minutes=minutes),
        requestStatusReport=False,
    )
    return {
        "name": item["name"],
        "pdus": [{"hex": str(p), "tpdu_length": p.tpduLength} for p in pdus],
    }


def guarded(function, item):
    """Reports gsmmodem's exceptions per item instead of aborting the run,
    because some of them are expected (e.g. it cannot encode emoji)."""
    try:
        return function(item)
    except Exception as error:  # noqa: BLE001 - every failure is data here
        return {"name": item["name"], "error": "%s: %s" % (type(error).__name__, error)}


def main():
    request = json.loads(sys.stdin.buffer.read().decode("ascii"))
    reply = {
        "decoded": [guarded(decode, item) for item in request["decode"]],
        "encoded": [guarded(encode, item) for item in request["encode"]],
    }
    sys.stdout.write(json.dumps(reply, ensure_ascii=True))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
