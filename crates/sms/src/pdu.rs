//! SMS-SUBMIT PDUs as a modem takes them with `AT+CMGS` in PDU mode
//! (TS 23.040 §9.2.2.2, TS 27.005 §3.5.1), and reading them back.

use std::fmt::Write as _;
use std::time::Duration;

use crate::gsm7;
use crate::split::{split, Concat, DataCoding, Part, SplitOptions};
use crate::{DecodeError, EncodeError};

/// TP-MTI for SMS-SUBMIT, in bits 0-1 of the first octet.
const MTI_SUBMIT: u8 = 0x01;
/// TP-MTI for SMS-DELIVER (network to phone).
const MTI_DELIVER: u8 = 0x00;
/// TP-RD: reject duplicates.
const FO_REJECT_DUPLICATES: u8 = 0x04;
/// TP-VPF bits (3-4) and the value for a relative validity period.
const FO_VPF_MASK: u8 = 0x18;
const FO_VPF_RELATIVE: u8 = 0x10;
const FO_VPF_ENHANCED: u8 = 0x08;
const FO_VPF_ABSOLUTE: u8 = 0x18;
/// TP-SRR: status report request.
const FO_STATUS_REPORT: u8 = 0x20;
/// TP-UDHI: the user data starts with a header.
const FO_UDHI: u8 = 0x40;
/// TP-RP: reply path.
const FO_REPLY_PATH: u8 = 0x80;
/// Type of address: international number, ISDN/telephone numbering plan.
const TOA_INTERNATIONAL: u8 = 0x91;
/// Type-of-number bits of a type-of-address octet.
const TON_MASK: u8 = 0x70;
const TON_INTERNATIONAL: u8 = 0x10;
const TON_ALPHANUMERIC: u8 = 0x50;
/// An address has at most 20 digits (10 octets) after its type octet
/// (TS 23.040 §9.1.2.5).
const MAX_ADDRESS_DIGITS: usize = 20;
const MAX_GSM7_UDL: u8 = 160;
const MAX_OCTET_UDL: u8 = 140;

/// A relative validity period: the TP-VP octet of TS 23.040 §9.2.3.12.1.
///
/// It is how long the SMSC keeps trying to deliver; a short one suits
/// verification codes that expire anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ValidityPeriod(u8);

impl ValidityPeriod {
    /// Uses a raw TP-VP octet as is.
    pub const fn from_octet(octet: u8) -> Self {
        Self(octet)
    }

    /// The TP-VP octet.
    pub const fn octet(self) -> u8 {
        self.0
    }

    /// The shortest representable period that is at least `duration`.
    ///
    /// The steps are 5 minutes up to 12 hours, 30 minutes up to 24 hours,
    /// days up to 30 days and weeks up to 63 weeks. Rounding up means the
    /// network never gives up before the requested time; anything below 5
    /// minutes becomes 5 minutes and anything above 63 weeks becomes 63 weeks.
    pub fn at_least(duration: Duration) -> Self {
        let minutes = duration.as_secs().div_ceil(60);
        let octet = if minutes <= 12 * 60 {
            minutes.div_ceil(5).saturating_sub(1)
        } else if minutes <= 24 * 60 {
            143 + (minutes - 12 * 60).div_ceil(30)
        } else if minutes <= 30 * 24 * 60 {
            166 + minutes.div_ceil(24 * 60)
        } else {
            192 + minutes.div_ceil(7 * 24 * 60)
        };
        Self(u8::try_from(octet).unwrap_or(u8::MAX))
    }

    /// The period this octet stands for.
    pub fn duration(self) -> Duration {
        let vp = u64::from(self.0);
        let minutes = match vp {
            0..=143 => (vp + 1) * 5,
            144..=167 => 12 * 60 + (vp - 143) * 30,
            168..=196 => (vp - 166) * 24 * 60,
            _ => (vp - 192) * 7 * 24 * 60,
        };
        Duration::from_secs(minutes * 60)
    }
}

/// The TP-VP field of a decoded SMS-SUBMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Validity {
    /// Relative format (TP-VPF = 10), the only one the encoder writes.
    Relative(ValidityPeriod),
    /// Enhanced format (TP-VPF = 01), seven octets kept raw.
    Enhanced([u8; 7]),
    /// Absolute format (TP-VPF = 11), a semi-octet time stamp kept raw.
    Absolute([u8; 7]),
}

/// Options for [`encode_submit`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// Part limit and concatenation reference.
    pub split: SplitOptions,
    /// A relative validity period, or `None` to omit TP-VP and let the SMSC
    /// use its default.
    pub validity: Option<ValidityPeriod>,
    /// Sets TP-SRR so that the network sends a delivery report.
    pub request_status_report: bool,
}

/// One part of a message as an SMS-SUBMIT PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitPdu {
    /// The part as gateways see it (coding, header, user data, text).
    pub part: Part,
    /// The whole PDU: the `00` SMSC octet followed by the TPDU.
    pub bytes: Vec<u8>,
    /// `bytes` as upper-case hex, ready to write after `AT+CMGS=<n>`.
    pub hex: String,
    /// The `<length>` argument of `AT+CMGS`: octets of the TPDU, that is
    /// the PDU without the SMSC part.
    pub tpdu_length: usize,
}

/// Encodes a text to `destination` as one SMS-SUBMIT PDU per part.
///
/// `destination` is an international number: `+` followed by 1 to 20
/// digits, no spaces. The PDU asks the modem to use the SIM's SMSC (length
/// octet `00`) and leaves TP-MR at `00` for the modem to fill in.
pub fn encode_submit(
    destination: &str,
    text: &str,
    options: &SubmitOptions,
) -> Result<Vec<SubmitPdu>, EncodeError> {
    let address = encode_destination(destination)?;
    let parts = split(text, &options.split)?;
    Ok(parts
        .into_iter()
        .map(|part| submit_pdu(&address, part, options))
        .collect())
}

/// The TP-DA field: digit count, type of address, then the digits as
/// semi-octets, low nibble first, with an `F` filler after an odd count.
fn encode_destination(destination: &str) -> Result<Vec<u8>, EncodeError> {
    let digits = destination
        .strip_prefix('+')
        .ok_or(EncodeError::InvalidDestination {
            reason: "it does not start with +",
        })?;
    if digits.is_empty() {
        return Err(EncodeError::InvalidDestination {
            reason: "it has no digits",
        });
    }
    if digits.len() > MAX_ADDRESS_DIGITS {
        return Err(EncodeError::InvalidDestination {
            reason: "it has more than 20 digits",
        });
    }
    let nibbles = digits
        .bytes()
        .map(|b| match b {
            b'0'..=b'9' => Ok(b - b'0'),
            _ => Err(EncodeError::InvalidDestination {
                reason: "it contains something other than digits after the +",
            }),
        })
        .collect::<Result<Vec<u8>, _>>()?;
    // At most 20 digits, checked above, so the count fits in one octet.
    let count = u8::try_from(nibbles.len()).unwrap_or(u8::MAX);
    let mut out = vec![count, TOA_INTERNATIONAL];
    out.extend(
        nibbles
            .chunks(2)
            .map(|pair| pair[0] | (pair.get(1).copied().unwrap_or(0x0F) << 4)),
    );
    Ok(out)
}

fn submit_pdu(address: &[u8], part: Part, options: &SubmitOptions) -> SubmitPdu {
    let mut first = MTI_SUBMIT;
    if options.validity.is_some() {
        first |= FO_VPF_RELATIVE;
    }
    if options.request_status_report {
        first |= FO_STATUS_REPORT;
    }
    if !part.udh.is_empty() {
        first |= FO_UDHI;
    }

    let (udl, user_data) = match part.coding {
        DataCoding::Gsm7 => {
            // The header is followed by fill bits up to the next septet
            // boundary (TS 23.040 §9.2.3.24), and TP-UDL counts the header
            // as that many septets.
            let header_septets = (part.udh.len() * 8).div_ceil(7);
            let mut packed = gsm7::pack(&part.user_data, header_septets);
            for (octet, &h) in packed.iter_mut().zip(&part.udh) {
                *octet = h;
            }
            (header_septets + part.user_data.len(), packed)
        }
        DataCoding::Ucs2 => {
            let mut octets = part.udh.clone();
            octets.extend_from_slice(&part.user_data);
            (octets.len(), octets)
        }
    };

    let mut bytes = Vec::with_capacity(16 + address.len() + user_data.len());
    bytes.push(0x00); // SMSC length 0: the modem uses the SIM's SMSC.
    bytes.push(first);
    bytes.push(0x00); // TP-MR: the modem assigns the message reference.
    bytes.extend_from_slice(address);
    bytes.push(0x00); // TP-PID: plain short message.
    bytes.push(part.coding.tp_dcs());
    if let Some(vp) = options.validity {
        bytes.push(vp.octet());
    }
    // `split` keeps every part within 160 septets or 140 octets.
    bytes.push(u8::try_from(udl).unwrap_or(u8::MAX));
    bytes.extend_from_slice(&user_data);

    SubmitPdu {
        hex: to_hex(&bytes),
        tpdu_length: bytes.len() - 1,
        bytes,
        part,
    }
}

/// Upper-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// Parses hex digits (either case) into bytes.
pub fn from_hex(hex: &str) -> Result<Vec<u8>, DecodeError> {
    if !hex.len().is_multiple_of(2) {
        return Err(DecodeError::OddHexLength { length: hex.len() });
    }
    let digit = |position: usize, c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(DecodeError::InvalidHex { position }),
    };
    hex.as_bytes()
        .chunks(2)
        .enumerate()
        .map(|(i, pair)| Ok(digit(2 * i, pair[0])? << 4 | digit(2 * i + 1, pair[1])?))
        .collect()
}

/// One information element of a user data header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InformationElement {
    /// The IEI (e.g. 0x00 for 8-bit concatenation).
    pub iei: u8,
    /// The element's data, without IEI and length.
    pub data: Vec<u8>,
}

/// An SMS-SUBMIT read back from a PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedSubmit {
    /// The SMSC number, or `None` for the `00` "use the SIM's" octet.
    pub smsc: Option<String>,
    /// TP-MR.
    pub message_reference: u8,
    /// TP-RD.
    pub reject_duplicates: bool,
    /// TP-SRR.
    pub status_report_request: bool,
    /// TP-RP.
    pub reply_path: bool,
    /// The destination, with a leading `+` if its type is international.
    pub destination: String,
    /// The destination's type-of-address octet (0x91 international).
    pub destination_type: u8,
    /// TP-PID.
    pub protocol_id: u8,
    /// The TP-DCS octet as found.
    pub dcs: u8,
    /// The coding TP-DCS selects.
    pub coding: DataCoding,
    /// TP-VP, if TP-VPF says one is present.
    pub validity: Option<Validity>,
    /// The complete user data header including its length octet, or empty.
    pub udh: Vec<u8>,
    /// The header's information elements in order.
    pub elements: Vec<InformationElement>,
    /// The concatenation element (8- or 16-bit reference), if present.
    pub concat: Option<Concat>,
    /// The text as user data: unpacked septets or UTF-16BE bytes.
    pub user_data: Vec<u8>,
    /// The decoded text of this part.
    pub text: String,
    /// Octets of the TPDU (the `AT+CMGS` length).
    pub tpdu_length: usize,
}

/// Decodes an SMS-SUBMIT PDU given as hex, SMSC part included.
pub fn decode_submit_hex(hex: &str) -> Result<DecodedSubmit, DecodeError> {
    decode_submit(&from_hex(hex)?)
}

/// Decodes an SMS-SUBMIT PDU, SMSC part included (as `AT+CMGS` takes it).
///
/// The decoder is strict: every length must agree with the data, so a PDU
/// that a modem would choke on is reported instead of half-read.
pub fn decode_submit(pdu: &[u8]) -> Result<DecodedSubmit, DecodeError> {
    let mut r = Reader { pdu, pos: 0 };

    let smsc = read_smsc(&mut r)?;
    let tpdu_length = pdu.len() - r.pos;

    let first = r.octet("first octet")?;
    let mti = first & 0x03;
    if mti != MTI_SUBMIT {
        return Err(DecodeError::NotSubmit { mti });
    }
    let message_reference = r.octet("TP-MR")?;

    let (destination, destination_type) = read_address(&mut r, "destination address")?;

    let protocol_id = r.octet("TP-PID")?;
    let dcs = r.octet("TP-DCS")?;
    let coding = coding_from_dcs(dcs)?;
    let validity = match first & FO_VPF_MASK {
        FO_VPF_RELATIVE => Some(Validity::Relative(ValidityPeriod(r.octet("TP-VP")?))),
        FO_VPF_ENHANCED => Some(Validity::Enhanced(r.seven("TP-VP")?)),
        FO_VPF_ABSOLUTE => Some(Validity::Absolute(r.seven("TP-VP")?)),
        _ => None,
    };

    let (udl, ud) = read_ud(&mut r, coding)?;

    let (udh, elements, concat, user_data, text) =
        decode_user_data(first, coding, udl, ud, pdu.len())?;

    Ok(DecodedSubmit {
        smsc,
        message_reference,
        reject_duplicates: first & FO_REJECT_DUPLICATES != 0,
        status_report_request: first & FO_STATUS_REPORT != 0,
        reply_path: first & FO_REPLY_PATH != 0,
        destination,
        destination_type,
        protocol_id,
        dcs,
        coding,
        validity,
        udh,
        elements,
        concat,
        user_data,
        text,
        tpdu_length,
    })
}

/// Reads the SMSC part that leads a PDU: `None` for the `00` "use the SIM's" octet.
fn read_smsc(r: &mut Reader<'_>) -> Result<Option<String>, DecodeError> {
    let smsc_len = r.octet("SMSC length")?;
    Ok(if smsc_len == 0 {
        None
    } else {
        if usize::from(smsc_len) > 1 + MAX_ADDRESS_DIGITS / 2 {
            return Err(DecodeError::AddressTooLong {
                field: "SMSC address",
                length: smsc_len,
            });
        }
        let field = r.take(usize::from(smsc_len), "SMSC address")?;
        let (toa, digits) = field.split_first().unwrap_or((&0, &[]));
        let number = semi_octets(digits, digits.len() * 2, "SMSC address", true)?;
        Some(with_plus(*toa, number))
    })
}

/// Reads a TP-DA or TP-OA: the number (with a leading `+` if its type is international, or the
/// text of an alphanumeric address) and its type-of-address octet.
fn read_address(r: &mut Reader<'_>, field: &'static str) -> Result<(String, u8), DecodeError> {
    let digit_count = r.octet(field)?;
    if usize::from(digit_count) > MAX_ADDRESS_DIGITS {
        return Err(DecodeError::AddressTooLong {
            field,
            length: digit_count,
        });
    }
    let address_type = r.octet(field)?;
    let address = r.take(usize::from(digit_count).div_ceil(2), field)?;
    let address_text = if address_type & TON_MASK == TON_ALPHANUMERIC {
        // The length counts semi-octets of packed septets (§9.1.2.5).
        let septets = gsm7::unpack(address, usize::from(digit_count) * 4 / 7).unwrap_or_default();
        gsm7::decode_septets(&septets)?
    } else {
        let number = semi_octets(address, usize::from(digit_count), field, false)?;
        with_plus(address_type, number)
    };
    Ok((address_text, address_type))
}

/// Reads TP-UDL and the TP-UD it announces, which must end the PDU.
fn read_ud<'a>(r: &mut Reader<'a>, coding: DataCoding) -> Result<(u8, &'a [u8]), DecodeError> {
    let udl = r.octet("TP-UDL")?;
    let (max, ud_octets) = match coding {
        DataCoding::Gsm7 => (MAX_GSM7_UDL, (usize::from(udl) * 7).div_ceil(8)),
        DataCoding::Ucs2 => (MAX_OCTET_UDL, usize::from(udl)),
    };
    if udl > max {
        return Err(DecodeError::UserDataTooLong { udl, max });
    }
    let ud = r.take(ud_octets, "user data")?;
    if r.pos < r.pdu.len() {
        return Err(DecodeError::TrailingData {
            extra: r.pdu.len() - r.pos,
        });
    }
    Ok((udl, ud))
}

/// The parts of a TP-UD: the header with its elements and concatenation element, the user data
/// (unpacked septets or UTF-16BE bytes) and the decoded text.
type UserData = (
    Vec<u8>,
    Vec<InformationElement>,
    Option<Concat>,
    Vec<u8>,
    String,
);

/// Decodes a TP-UD of `udl` (septets or octets, as `coding` says) whose first octet carries
/// TP-UDHI; `pdu_len` only names the offset of a truncation.
fn decode_user_data(
    first: u8,
    coding: DataCoding,
    udl: u8,
    ud: &[u8],
    pdu_len: usize,
) -> Result<UserData, DecodeError> {
    let (udh, elements) = if first & FO_UDHI != 0 {
        parse_udh(ud)?
    } else {
        (Vec::new(), Vec::new())
    };
    let concat = elements.iter().find_map(concat_from);

    let (user_data, text) = match coding {
        DataCoding::Gsm7 => {
            let header_septets = (udh.len() * 8).div_ceil(7);
            let count = usize::from(udl);
            if header_septets > count {
                return Err(DecodeError::InvalidUdh {
                    reason: "the header is longer than TP-UDL",
                });
            }
            let all = gsm7::unpack(ud, count).ok_or(DecodeError::Truncated {
                field: "user data",
                offset: pdu_len,
            })?;
            let septets = all.get(header_septets..).unwrap_or_default().to_vec();
            let text = gsm7::decode_septets(&septets)?;
            (septets, text)
        }
        DataCoding::Ucs2 => {
            let body = ud.get(udh.len()..).unwrap_or_default();
            if body.len() % 2 != 0 {
                return Err(DecodeError::OddUcs2Length { length: body.len() });
            }
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            let text = String::from_utf16(&units).map_err(|_| DecodeError::UnpairedSurrogate)?;
            (body.to_vec(), text)
        }
    };

    Ok((udh, elements, concat, user_data, text))
}

/// An SMS-DELIVER read from a PDU, as a modem lists a received message (`AT+CMGL`, `AT+CMGR` in
/// PDU mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedDeliver {
    /// The SMSC number, or `None` when the PDU starts with `00`.
    pub smsc: Option<String>,
    /// The sender, with a leading `+` if its type is international (or an alphanumeric name).
    pub originator: String,
    /// The sender's type-of-address octet (0x91 international).
    pub originator_type: u8,
    /// TP-PID.
    pub protocol_id: u8,
    /// The TP-DCS octet as found.
    pub dcs: u8,
    /// The coding TP-DCS selects.
    pub coding: DataCoding,
    /// TP-SCTS, the SMSC's time stamp, as its seven semi-octet octets.
    pub timestamp: [u8; 7],
    /// The concatenation element (8- or 16-bit reference), if present.
    pub concat: Option<Concat>,
    /// The decoded text of this part.
    pub text: String,
}

/// Decodes an SMS-DELIVER PDU given as hex, SMSC part included.
pub fn decode_deliver_hex(hex: &str) -> Result<DecodedDeliver, DecodeError> {
    decode_deliver(&from_hex(hex)?)
}

/// Decodes an SMS-DELIVER PDU (TS 23.040 §9.2.2.1), SMSC part included, as strictly as
/// [`decode_submit`]: the sender comes from the network, the text from anyone.
pub fn decode_deliver(pdu: &[u8]) -> Result<DecodedDeliver, DecodeError> {
    let mut r = Reader { pdu, pos: 0 };
    let smsc = read_smsc(&mut r)?;
    let first = r.octet("first octet")?;
    let mti = first & 0x03;
    if mti != MTI_DELIVER {
        return Err(DecodeError::NotDeliver { mti });
    }
    let (originator, originator_type) = read_address(&mut r, "originator address")?;
    let protocol_id = r.octet("TP-PID")?;
    let dcs = r.octet("TP-DCS")?;
    let coding = coding_from_dcs(dcs)?;
    let timestamp = r.seven("TP-SCTS")?;
    let (udl, ud) = read_ud(&mut r, coding)?;
    let (_, _, concat, _, text) = decode_user_data(first, coding, udl, ud, pdu.len())?;
    Ok(DecodedDeliver {
        smsc,
        originator,
        originator_type,
        protocol_id,
        dcs,
        coding,
        timestamp,
        concat,
        text,
    })
}

/// A cursor over the PDU that turns running out of data into an error
/// naming the field, instead of panicking on a short network input.
struct Reader<'a> {
    pdu: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let slice = self
            .pdu
            .get(self.pos..self.pos + n)
            .ok_or(DecodeError::Truncated {
                field,
                offset: self.pdu.len(),
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn octet(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    fn seven(&mut self, field: &'static str) -> Result<[u8; 7], DecodeError> {
        let mut out = [0u8; 7];
        out.copy_from_slice(self.take(7, field)?);
        Ok(out)
    }
}

/// Reads `count` semi-octet digits, low nibble first (TS 23.040 §9.1.2.3).
///
/// The SMSC field gives its length in octets, so its digit count is only an
/// upper bound and an `F` filler ends it (`filler_ends`).
fn semi_octets(
    octets: &[u8],
    count: usize,
    field: &'static str,
    filler_ends: bool,
) -> Result<String, DecodeError> {
    let mut out = String::with_capacity(count);
    for nibble in octets.iter().flat_map(|o| [o & 0x0F, o >> 4]).take(count) {
        let c = match nibble {
            0..=9 => char::from(b'0' + nibble),
            0x0A => '*',
            0x0B => '#',
            0x0C => 'a',
            0x0D => 'b',
            0x0E => 'c',
            _ if filler_ends => break,
            _ => return Err(DecodeError::InvalidAddressDigit { field, nibble }),
        };
        out.push(c);
    }
    Ok(out)
}

fn with_plus(type_of_address: u8, number: String) -> String {
    if type_of_address & TON_MASK == TON_INTERNATIONAL {
        format!("+{number}")
    } else {
        number
    }
}

/// The coding for a TP-DCS octet (TS 23.038 §4), for the groups that carry
/// uncompressed GSM 7-bit or UCS-2 text.
fn coding_from_dcs(dcs: u8) -> Result<DataCoding, DecodeError> {
    let unsupported = Err(DecodeError::UnsupportedDataCoding { dcs });
    match dcs >> 4 {
        // General data coding (and its automatic-deletion twin): bit 5 says
        // compressed, bits 2-3 give the alphabet.
        0x0..=0x7 => {
            if dcs & 0x20 != 0 {
                return unsupported;
            }
            match (dcs >> 2) & 0x03 {
                0 => Ok(DataCoding::Gsm7),
                2 => Ok(DataCoding::Ucs2),
                _ => unsupported,
            }
        }
        // Message waiting indication groups: discard/store with GSM 7-bit,
        // store with UCS-2.
        0xC | 0xD => Ok(DataCoding::Gsm7),
        0xE => Ok(DataCoding::Ucs2),
        // Data coding/message class: bit 2 selects GSM 7-bit or 8-bit data.
        0xF if dcs & 0x04 == 0 => Ok(DataCoding::Gsm7),
        _ => unsupported,
    }
}

/// Splits the user data header off the user data and lists its elements.
fn parse_udh(ud: &[u8]) -> Result<(Vec<u8>, Vec<InformationElement>), DecodeError> {
    let (&udhl, rest) = ud.split_first().ok_or(DecodeError::InvalidUdh {
        reason: "TP-UDHI is set but the user data is empty",
    })?;
    let mut body = rest
        .get(..usize::from(udhl))
        .ok_or(DecodeError::InvalidUdh {
            reason: "the header length exceeds the user data",
        })?;
    let mut elements = Vec::new();
    while let Some((&iei, after)) = body.split_first() {
        let (&len, after) = after.split_first().ok_or(DecodeError::InvalidUdh {
            reason: "an element has no length octet",
        })?;
        let data = after
            .get(..usize::from(len))
            .ok_or(DecodeError::InvalidUdh {
                reason: "an element runs past the end of the header",
            })?;
        elements.push(InformationElement {
            iei,
            data: data.to_vec(),
        });
        body = after.get(usize::from(len)..).unwrap_or_default();
    }
    Ok((ud[..=usize::from(udhl)].to_vec(), elements))
}

fn concat_from(ie: &InformationElement) -> Option<Concat> {
    match (ie.iei, ie.data.as_slice()) {
        (0x00, &[reference, total, sequence]) => Some(Concat {
            reference: u16::from(reference),
            total,
            sequence,
        }),
        (0x08, &[high, low, total, sequence]) => Some(Concat {
            reference: u16::from_be_bytes([high, low]),
            total,
            sequence,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_rounds_up_to_the_next_step() {
        let cases: &[(u64, u8)] = &[
            (0, 0x00),
            (60, 0x00),
            (300, 0x00),
            (301, 0x01),
            (600, 0x01),
            (3600, 0x0B),          // 1 hour
            (12 * 3600, 143),      // 12 hours
            (12 * 3600 + 1, 144),  // just over 12 hours
            (24 * 3600, 167),      // 24 hours
            (24 * 3600 + 60, 168), // just over a day: 2 days
            (4 * 24 * 3600, 0xAA), // 4 days, the classic example
            (30 * 24 * 3600, 196), // 30 days
            (31 * 24 * 3600, 197), // 5 weeks
            (63 * 7 * 24 * 3600, 255),
            (u64::MAX, 255),
        ];
        for &(secs, octet) in cases {
            let vp = ValidityPeriod::at_least(Duration::from_secs(secs));
            assert_eq!(vp.octet(), octet, "{secs} s");
            if secs <= 63 * 7 * 24 * 3600 {
                assert!(vp.duration() >= Duration::from_secs(secs), "{secs} s");
            }
        }
    }

    #[test]
    fn validity_round_trips_every_octet() {
        for octet in 0..=255u8 {
            let vp = ValidityPeriod::from_octet(octet);
            assert_eq!(ValidityPeriod::at_least(vp.duration()), vp, "octet {octet}");
        }
    }

    #[test]
    fn dcs_groups() {
        assert_eq!(coding_from_dcs(0x00), Ok(DataCoding::Gsm7));
        assert_eq!(coding_from_dcs(0x08), Ok(DataCoding::Ucs2));
        assert_eq!(coding_from_dcs(0x10), Ok(DataCoding::Gsm7)); // class 0 (flash)
        assert_eq!(coding_from_dcs(0x18), Ok(DataCoding::Ucs2));
        assert_eq!(coding_from_dcs(0xF0), Ok(DataCoding::Gsm7));
        assert_eq!(coding_from_dcs(0xE0), Ok(DataCoding::Ucs2));
        for dcs in [0x04, 0x0C, 0x20, 0x28, 0x80, 0xB0, 0xF4] {
            assert_eq!(
                coding_from_dcs(dcs),
                Err(DecodeError::UnsupportedDataCoding { dcs })
            );
        }
    }

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(from_hex("00aBfF"), Ok(vec![0x00, 0xAB, 0xFF]));
        assert_eq!(to_hex(&[0x00, 0xAB, 0xFF]), "00ABFF");
        assert_eq!(from_hex("0"), Err(DecodeError::OddHexLength { length: 1 }));
        assert_eq!(from_hex("0g"), Err(DecodeError::InvalidHex { position: 1 }));
        // A multi-byte character must be reported, not sliced through.
        assert!(from_hex("€0").is_err());
    }
}

#[cfg(test)]
mod deliver_tests {
    use super::*;

    #[test]
    fn deliver_pdus_decode_or_are_refused() {
        // The SMS-DELIVER example of the GSM 03.40 tutorials: "How are you?" from +31641600986
        // through the SMSC +31624000000.
        let decoded = decode_deliver_hex(
            "07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07",
        )
        .expect("the example decodes");
        assert_eq!(decoded.smsc.as_deref(), Some("+31624000000"));
        assert_eq!(decoded.originator, "+31641600986");
        assert_eq!(decoded.originator_type, 0x91);
        assert_eq!(decoded.coding, DataCoding::Gsm7);
        assert_eq!(decoded.text, "How are you?");
        assert_eq!(decoded.concat, None);

        let refused: &[(&str, &str)] = &[
            // An SMS-SUBMIT is not a received message.
            (
                "0001000B916407281553F800000AE8329BFD4697D9EC37",
                "SMS-DELIVER",
            ),
            // Cut inside the time stamp.
            (
                "07911326040000F0040B911346610089F600002080",
                "while reading TP-SCTS",
            ),
            // One octet more than TP-UDL announces.
            (
                "07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD0700",
                "after the user data",
            ),
            ("", "while reading SMSC length"),
        ];
        for (hex, expected) in refused {
            let error = decode_deliver_hex(hex).expect_err(hex).to_string();
            assert!(error.contains(expected), "{hex}: {error}");
        }
    }
}
