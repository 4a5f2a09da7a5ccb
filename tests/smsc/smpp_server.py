"""A test SMSC for the SMPP transport, built on smppy's SmppProtocol and smpppdu's PDU codec.

It listens on 127.0.0.1:<port>, accepts bind_transceiver and bind_transmitter for one account,
answers enquire_link and unbind, and appends every submit_sm it accepts to a JSON-lines record
file. Knobs the test controls:
  --throttle N      answer the first N submit_sm with ESME_RTHROTTLED (not accepted)
  --drop-after N    close the connection right after answering the N-th accepted submit_sm (once)
  --drop-on N       record the N-th submit_sm, then close without answering it (once)
  --receipts STAT   on a transceiver bind, send a delivery receipt (deliver_sm) with this stat
A line "<from> <to> <text>" on stdin is an SMS a phone sent to the account: it goes out as a
deliver_sm on the first transceiver bind (kept until one binds) and is appended to
<record>.delivered once the ESME answered it with deliver_sm_resp.
Prints "listening" once the port is open.
"""

import argparse
import asyncio
import io
import json
import struct
import sys
import traceback

from gsmmodem.pdu import decodeGsm7
from smppy import Application, SmppClient
from smppy.server import SmppProtocol
from smpp.pdu.operations import BindTransceiverResp, BindTransmitterResp, DeliverSM, SubmitSMResp
from smpp.pdu.pdu_encoding import PDUEncoder
from smpp.pdu.pdu_types import (
    AddrNpi, AddrTon, CommandId, CommandStatus, DataCoding, DataCodingDefault, EsmClass,
    EsmClassMode, EsmClassType, RegisteredDelivery, RegisteredDeliveryReceipt,
)


def as_text(value):
    """smpppdu gives C-octet strings as str or bytes depending on the field."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def encoded(name, value):
    """The raw octet smpppdu would write for a decoded parameter."""
    return PDUEncoder.DefaultRequiredParamEncoders[name].encode(value)[0]


class State:
    def __init__(self, args):
        self.args = args
        self.submits = 0
        self.accepted = 0
        self.dropped_after = False
        self.dropped_on = False
        self.message_id = 0
        self.transceivers = []
        self.pending = []

    def deliver(self, line):
        sender, _, rest = line.partition(" ")
        to, _, text = rest.partition(" ")
        self.pending.append((sender, to, text))
        self.flush()

    def flush(self):
        while self.pending and self.transceivers:
            self.transceivers[0].mobile_originated(*self.pending.pop(0))


class Smsc(Application):
    def __init__(self, state):
        self.state = state
        super().__init__(name="testsmsc")

    async def handle_bound_client(self, client: SmppClient):
        args = self.state.args
        if as_text(client.system_id) == args.system_id and as_text(client.password) == args.password:
            return client
        return None

    async def handle_unbound_client(self, client):
        pass

    async def handle_sms_received(self, client, source_number, dest_number, text):
        pass


class Protocol(SmppProtocol):
    """smppy's protocol with PDU framing (smppy reads one PDU per read) and the knobs."""

    def __init__(self, app, state):
        super().__init__(app=app)
        self.state = state
        self.buffer = b""
        self.queue = asyncio.Queue()
        self.transceiver = False
        asyncio.get_event_loop().create_task(self.worker())

    def data_received(self, data):
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack("!L", self.buffer[:4])
            if len(self.buffer) < length:
                break
            self.queue.put_nowait(self.buffer[:length])
            self.buffer = self.buffer[length:]

    def connection_lost(self, exc):
        if self in self.state.transceivers:
            self.state.transceivers.remove(self)
        self.queue.put_nowait(None)
        super().connection_lost(exc)

    async def worker(self):
        while True:
            raw = await self.queue.get()
            if raw is None or self._transport is None:
                return
            try:
                pdu = PDUEncoder().decode(io.BytesIO(raw))
                if pdu.command_id == CommandId.submit_sm:
                    self.submit(pdu)
                elif pdu.command_id in (CommandId.bind_transmitter, CommandId.bind_transceiver):
                    await self.bind(pdu, raw)
                elif pdu.command_id == CommandId.deliver_sm_resp:
                    with open(self.state.args.record + ".delivered", "a", encoding="utf-8") as f:
                        f.write(json.dumps({"sequence_number": pdu.sequence_number,
                                            "status": str(pdu.status)}) + "\n")
                else:
                    await self.handle_data_received(raw)
            except Exception:
                traceback.print_exc()

    async def bind(self, pdu, raw):
        """smppy binds transceivers only and refuses with a generic ESME_RBINDFAIL; an SMSC
        names a wrong password, and a transmitter bind is answered the same way."""
        ok = (as_text(pdu.params["system_id"]) == self.state.args.system_id
              and as_text(pdu.params["password"]) == self.state.args.password)
        transceiver = pdu.command_id == CommandId.bind_transceiver
        if ok and transceiver:
            self.transceiver = True
            await self.handle_data_received(raw)
            self.state.transceivers.append(self)
            self.state.flush()
            return
        self.is_bound = ok
        response = BindTransceiverResp if transceiver else BindTransmitterResp
        self._send_PDU(response(
            sequence_number=pdu.sequence_number,
            status=CommandStatus.ESME_ROK if ok else CommandStatus.ESME_RINVPASWD,
            system_id="testsmsc"))

    def submit(self, pdu):
        state, args = self.state, self.state.args
        state.submits += 1
        if not self.is_bound:
            self._send_PDU(SubmitSMResp(sequence_number=pdu.sequence_number,
                                        status=CommandStatus.ESME_RINVBNDSTS))
            return
        if state.submits <= args.throttle:
            self._send_PDU(SubmitSMResp(sequence_number=pdu.sequence_number,
                                        status=CommandStatus.ESME_RTHROTTLED))
            return
        state.accepted += 1
        state.message_id += 1
        message_id = f"m{state.message_id}"
        self.record(pdu, message_id)
        if args.drop_on and state.accepted == args.drop_on and not state.dropped_on:
            state.dropped_on = True
            self._transport.close()
            return
        self._send_PDU(SubmitSMResp(sequence_number=pdu.sequence_number, message_id=message_id))
        if args.receipts and self.transceiver:
            self.receipt(pdu, message_id)
        if args.drop_after and state.accepted == args.drop_after and not state.dropped_after:
            state.dropped_after = True
            self._transport.close()

    def record(self, pdu, message_id):
        p = pdu.params
        esm_class = encoded("esm_class", p["esm_class"])
        data_coding = encoded("data_coding", p["data_coding"])
        short_message = p["short_message"] or b""
        udh = b""
        if esm_class & 0x40:
            udh = short_message[: short_message[0] + 1]
        body = short_message[len(udh):]
        # The text as an independent decoder reads it: GSM 7-bit (unpacked) or UCS-2.
        if data_coding == 8:
            text = body.decode("utf-16-be")
        else:
            text = decodeGsm7(bytearray(body))
        entry = {
            "message_id": message_id,
            "system_id": self._client.system_id if self._client else None,
            "source_addr": as_text(p["source_addr"]),
            "source_addr_ton": encoded("source_addr_ton", p["source_addr_ton"]),
            "source_addr_npi": encoded("source_addr_npi", p["source_addr_npi"]),
            "destination_addr": as_text(p["destination_addr"]),
            "dest_addr_ton": encoded("dest_addr_ton", p["dest_addr_ton"]),
            "esm_class": esm_class,
            "data_coding": data_coding,
            "udh": udh.hex(),
            "text": text,
            "sar_msg_ref_num": p.get("sar_msg_ref_num"),
            "sar_total_segments": p.get("sar_total_segments"),
            "sar_segment_seqnum": p.get("sar_segment_seqnum"),
        }
        with open(self.state.args.record, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def mobile_originated(self, sender, to, text):
        self._send_PDU(DeliverSM(
            sequence_number=self.next_sequence_number(),
            source_addr_ton=AddrTon.INTERNATIONAL,
            source_addr_npi=AddrNpi.ISDN,
            source_addr=sender.lstrip("+"),
            dest_addr_ton=AddrTon.INTERNATIONAL,
            dest_addr_npi=AddrNpi.ISDN,
            destination_addr=to.lstrip("+"),
            esm_class=EsmClass(EsmClassMode.DEFAULT, EsmClassType.DEFAULT),
            registered_delivery=RegisteredDelivery(
                RegisteredDeliveryReceipt.NO_SMSC_DELIVERY_RECEIPT_REQUESTED),
            data_coding=DataCoding(scheme_data=DataCodingDefault.SMSC_DEFAULT_ALPHABET),
            short_message=text.encode("ascii"),
        ))

    def receipt(self, pdu, message_id):
        stat = self.state.args.receipts
        text = (f"id:{message_id} sub:001 dlvrd:001 submit date:2611250000 "
                f"done date:2611250000 stat:{stat} err:000 text:")
        self._send_PDU(DeliverSM(
            sequence_number=self.next_sequence_number(),
            source_addr_ton=AddrTon.INTERNATIONAL,
            source_addr_npi=AddrNpi.ISDN,
            source_addr=pdu.params["destination_addr"],
            dest_addr_ton=AddrTon.INTERNATIONAL,
            dest_addr_npi=AddrNpi.ISDN,
            destination_addr=pdu.params["source_addr"],
            esm_class=EsmClass(EsmClassMode.DEFAULT, EsmClassType.SMSC_DELIVERY_RECEIPT),
            registered_delivery=RegisteredDelivery(
                RegisteredDeliveryReceipt.NO_SMSC_DELIVERY_RECEIPT_REQUESTED),
            data_coding=DataCoding(scheme_data=DataCodingDefault.SMSC_DEFAULT_ALPHABET),
            short_message=text.encode("ascii"),
        ))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--system-id", default="tidings")
    parser.add_argument("--password", default="secret1")
    parser.add_argument("--throttle", type=int, default=0)
    parser.add_argument("--drop-after", type=int, default=0)
    parser.add_argument("--drop-on", type=int, default=0)
    parser.add_argument("--receipts", default="")
    args = parser.parse_args()
    state = State(args)
    app = Smsc(state)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(
        loop.create_server(lambda: Protocol(app, state), host="127.0.0.1", port=args.port))
    def on_stdin():
        line = sys.stdin.readline()
        if not line:
            loop.remove_reader(sys.stdin.fileno())
        elif line.strip():
            state.deliver(line.rstrip("\n"))

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    print("listening", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    sys.exit(main())
