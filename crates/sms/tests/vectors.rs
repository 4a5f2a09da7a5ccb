//! Data-driven encoder and decoder vectors: published PDU examples, boundary
//! lengths, UCS-2 and GSM-7 extension characters, part limits and malformed
//! PDUs. Every encoder case runs through `check`, which also decodes each PDU
//! back and checks the invariants every message must keep.

use std::time::Duration;

use tidings_sms::{
    decode_submit, decode_submit_hex, encode_submit, split, to_hex, Concat, DataCoding,
    DecodeError, EncodeError, SplitOptions, SubmitOptions, SubmitPdu, Validity, ValidityPeriod,
};

/// The destination of the Dreamfabric example, reused for most cases.
const DEST: &str = "+46708251358";
/// The same number as a TP-DA field: 11 digits, international, F filler.
const DEST_DA: &str = "0B916407281553F8";

/// The text of part 1 of the concatenated example in Shekhar Biradar's
/// article "Send and Receive Concatenated SMS in PDU mode": 153 septets.
const LOREM_153: &str = "Lorem ipsum dolor sit amet, consectetur adipisicing elit, sed do \
eiusmod tempor incididunt ut labore et dolore magna aliqua.Ut enim ad minim veniam, quis";

/// Part 1 of 3 from that article, as printed there (AT+CMGS=153).
const BIRADAR_PART_1: &str = "0041000C911999083196670000A0050003000301986F79B90D4AC3E7F53688\
FC66BFE5A0799A0E0AB7CB741668FC76CFCB637A995E9783C2E4343C3D4F8FD3EE33A8CC4ED359A079990C22BF\
41E5747DDE7E9341F4721BFE9683D2EE719A9C26D7DD74509D0E6287C56F791954A683C86FF65B5E06B5C36777\
181466A7E3F5B0AB4A0795DDE936284C06B5D3EE741B642FBBD3E1360B14AFA7E7";

/// The SMS-SUBMIT example of the Nordic Semiconductor nRF91 AT Commands
/// reference, `+CMGS` set command, sent with `AT+CMGS=42` through SMSC
/// +448888888. Its prose calls the text "Testing a SMS messaging over LTE",
/// but the septets it encodes (and every decoder, ours and gsmmodem's)
/// read "Testing a sms messaging over lte": the hex is the authority here.
const NORDIC_CMGS: &str = "069144888888F811000C9153481032547600000B20D4F29C9E769F4161\
D0BC3D07B5CBF379F89C769F416F7B590E62D3CB";
const NORDIC_TEXT: &str = "Testing a sms messaging over lte";

enum Expect {
    /// The complete hex of every part, in order.
    Pdus(Vec<String>),
    /// The hex of the first part and how many parts there are.
    FirstPdu { hex: &'static str, parts: usize },
    /// The coding and the length of each part in septets or code units.
    Shape {
        coding: DataCoding,
        units: Vec<usize>,
    },
    /// Encoding must fail with exactly this error.
    Error(EncodeError),
}

struct Case {
    name: &'static str,
    destination: &'static str,
    text: String,
    options: SubmitOptions,
    expect: Expect,
}

fn case(name: &'static str, text: impl Into<String>, expect: Expect) -> Case {
    Case {
        name,
        destination: DEST,
        text: text.into(),
        options: SubmitOptions::default(),
        expect,
    }
}

impl Case {
    fn to(mut self, destination: &'static str) -> Self {
        self.destination = destination;
        self
    }

    fn with(mut self, options: SubmitOptions) -> Self {
        self.options = options;
        self
    }
}

fn pdus(hexes: &[&str]) -> Expect {
    Expect::Pdus(hexes.iter().map(|h| h.to_string()).collect())
}

fn shape(coding: DataCoding, units: &[usize]) -> Expect {
    Expect::Shape {
        coding,
        units: units.to_vec(),
    }
}

fn gsm(units: &[usize]) -> Expect {
    shape(DataCoding::Gsm7, units)
}

fn ucs2(units: &[usize]) -> Expect {
    shape(DataCoding::Ucs2, units)
}

fn too_many(needed: usize, limit: u8) -> Expect {
    Expect::Error(EncodeError::TooManyParts { needed, limit })
}

fn bad_destination(reason: &'static str) -> Expect {
    Expect::Error(EncodeError::InvalidDestination { reason })
}

fn rep(s: &str, n: usize) -> String {
    s.repeat(n)
}

fn max_parts(max_parts: u8) -> SubmitOptions {
    SubmitOptions {
        split: SplitOptions {
            max_parts,
            ..SplitOptions::default()
        },
        ..SubmitOptions::default()
    }
}

fn validity(vp: ValidityPeriod) -> SubmitOptions {
    SubmitOptions {
        validity: Some(vp),
        ..SubmitOptions::default()
    }
}

/// Runs one encoder case: the expectation, then every invariant.
fn check(case: &Case) {
    let name = case.name;
    let result = encode_submit(case.destination, &case.text, &case.options);
    let pdus = match (&case.expect, result) {
        (Expect::Error(want), got) => {
            assert_eq!(got.as_ref().err(), Some(want), "{name}: expected an error");
            // The message must not repeat the number (privacy).
            let digits = case.destination.trim_start_matches('+');
            if digits.len() >= 5 {
                assert!(
                    !want.to_string().contains(digits),
                    "{name}: number in error"
                );
            }
            return;
        }
        (_, Err(e)) => panic!("{name}: unexpected error: {e}"),
        (_, Ok(pdus)) => pdus,
    };
    match &case.expect {
        Expect::Pdus(want) => {
            let got: Vec<&str> = pdus.iter().map(|p| p.hex.as_str()).collect();
            assert_eq!(got, *want, "{name}: PDUs");
        }
        Expect::FirstPdu { hex, parts } => {
            assert_eq!(pdus.len(), *parts, "{name}: part count");
            assert_eq!(pdus[0].hex, *hex, "{name}: first PDU");
        }
        Expect::Shape { coding, units } => {
            let got: Vec<usize> = pdus.iter().map(|p| p.part.units()).collect();
            assert_eq!(got, *units, "{name}: units per part");
            for p in &pdus {
                assert_eq!(p.part.coding, *coding, "{name}: coding");
            }
        }
        Expect::Error(_) => unreachable!(),
    }
    check_invariants(name, case.destination, &case.text, &case.options, &pdus);
}

/// What every successful encoding must satisfy, whatever the text.
fn check_invariants(
    name: &str,
    destination: &str,
    text: &str,
    options: &SubmitOptions,
    pdus: &[SubmitPdu],
) {
    let parts = split(text, &options.split).expect("split agrees with encode_submit");
    assert_eq!(parts.len(), pdus.len(), "{name}: split and encode agree");
    assert!(
        pdus.len() <= usize::from(options.split.max_parts),
        "{name}: limit"
    );
    let joined: String = pdus.iter().map(|p| p.part.text.as_str()).collect();
    assert_eq!(joined, text, "{name}: parts rejoin to the text");

    let total = pdus.len();
    let concatenated = total > 1;
    for (i, (pdu, part)) in pdus.iter().zip(&parts).enumerate() {
        let p = &pdu.part;
        assert_eq!(p, part, "{name} part {i}: split and encode agree");
        assert_eq!(pdu.hex, to_hex(&pdu.bytes), "{name} part {i}: hex");
        assert_eq!(pdu.bytes[0], 0x00, "{name} part {i}: SMSC octet");
        assert_eq!(
            pdu.tpdu_length,
            pdu.bytes.len() - 1,
            "{name} part {i}: TPDU length"
        );
        assert!(
            p.units() <= p.coding.capacity(concatenated),
            "{name} part {i}: {} units is over capacity",
            p.units()
        );
        assert!(
            !p.text.is_empty() || total == 1,
            "{name} part {i}: empty part"
        );
        match p.coding {
            DataCoding::Gsm7 => assert!(p.user_data.iter().all(|&s| s < 0x80)),
            DataCoding::Ucs2 => assert_eq!(p.user_data.len() % 2, 0),
        }
        // Greedy splitting: a part only ends early to keep a character whole.
        if let Some(next) = pdus.get(i + 1) {
            let first = next.part.text.chars().next().expect("non-empty");
            let width = match p.coding {
                DataCoding::Gsm7 => split(&first.to_string(), &SplitOptions::default())
                    .expect("one char")[0]
                    .units(),
                DataCoding::Ucs2 => first.len_utf16(),
            };
            assert!(
                p.units() + width > p.coding.capacity(true),
                "{name} part {i}: ended early"
            );
        }
        if concatenated {
            let seq = u8::try_from(i + 1).expect("at most 255 parts");
            let total = u8::try_from(total).expect("at most 255 parts");
            let reference = options.split.reference;
            assert_eq!(
                p.udh,
                vec![0x05, 0x00, 0x03, reference, total, seq],
                "{name} part {i}: UDH"
            );
            assert_eq!(
                p.concat,
                Some(Concat {
                    reference: u16::from(reference),
                    total,
                    sequence: seq
                })
            );
            assert_eq!(p.esm_class(), 0x40);
        } else {
            assert!(p.udh.is_empty() && p.concat.is_none(), "{name}: no UDH");
            assert_eq!(p.esm_class(), 0x00);
        }
        let mut short_message = p.udh.clone();
        short_message.extend_from_slice(&p.user_data);
        assert_eq!(p.short_message(), short_message);

        // The decoder reads back exactly what was encoded.
        let d = decode_submit_hex(&pdu.hex)
            .unwrap_or_else(|e| panic!("{name} part {i}: our own PDU does not decode: {e}"));
        assert_eq!(d, decode_submit(&pdu.bytes).expect("same bytes"));
        assert_eq!(d.smsc, None);
        assert_eq!(d.message_reference, 0);
        assert_eq!(d.destination, destination, "{name} part {i}: destination");
        assert_eq!(d.destination_type, 0x91);
        assert_eq!(d.protocol_id, 0);
        assert_eq!(d.dcs, p.coding.tp_dcs());
        assert_eq!(d.coding, p.coding);
        assert_eq!(d.validity, options.validity.map(Validity::Relative));
        assert_eq!(d.status_report_request, options.request_status_report);
        assert!(!d.reject_duplicates && !d.reply_path);
        assert_eq!(d.udh, p.udh, "{name} part {i}: decoded UDH");
        assert_eq!(d.concat, p.concat);
        assert_eq!(
            d.user_data, p.user_data,
            "{name} part {i}: decoded user data"
        );
        assert_eq!(d.text, p.text, "{name} part {i}: decoded text");
        assert_eq!(d.tpdu_length, pdu.tpdu_length);
    }
}

fn encoder_cases() -> Vec<Case> {
    vec![
        // Lars Pettersson, "SMS messages and the PDU format" (Dreamfabric),
        // the SMS-SUBMIT example: "hellohello" to +46708251358, TP-VP AA
        // (4 days), user data E8329BFD4697D9EC37.
        case(
            "dreamfabric hellohello, VP AA",
            "hellohello",
            pdus(&["0011000B916407281553F80000AA0AE8329BFD4697D9EC37"]),
        )
        .with(validity(ValidityPeriod::from_octet(0xAA))),
        case(
            "dreamfabric hellohello, VP from 4 days",
            "hellohello",
            pdus(&["0011000B916407281553F80000AA0AE8329BFD4697D9EC37"]),
        )
        .with(validity(ValidityPeriod::at_least(Duration::from_secs(4 * 86_400)))),
        case(
            "hellohello without VP",
            "hellohello",
            pdus(&[&format!("000100{DEST_DA}00000AE8329BFD4697D9EC37")]),
        ),
        // Nordic nRF91 AT Commands reference, +CMGS: the same TPDU (42
        // octets) with our 00 SMSC octet in place of +448888888.
        case(
            "nordic +CMGS example",
            NORDIC_TEXT,
            pdus(&[&format!("00{}", &NORDIC_CMGS[14..])]),
        )
        .to("+358401234567")
        .with(validity(ValidityPeriod::at_least(Duration::from_secs(3600)))),
        // Shekhar Biradar, "Send and Receive Concatenated SMS in PDU mode":
        // part 1 of 3, reference 00, one fill bit after the 6-octet header.
        case(
            "biradar concatenated part 1 of 3",
            format!("{LOREM_153}{}", rep("x", 200)),
            Expect::FirstPdu {
                hex: BIRADAR_PART_1,
                parts: 3,
            },
        )
        .to("+919980136976"),
        case("empty text", "", pdus(&[&format!("000100{DEST_DA}000000")])),
        case("single escape character", "€", pdus(&[&format!("000100{DEST_DA}0000029B32")])),
        case(
            "status report request",
            "hi",
            pdus(&[&format!("002100{DEST_DA}000002E834")]),
        )
        .with(SubmitOptions {
            request_status_report: true,
            ..SubmitOptions::default()
        }),
        case(
            "even number of digits, partial last octet",
            "hello",
            pdus(&["0001000C91447700091032000005E8329BFD06"]),
        )
        .to("+447700900123"),
        case("upper-case C cedilla is GSM 0x09", "Ç", pdus(&[&format!("000100{DEST_DA}00000109")])),
        case("lower-case c cedilla needs UCS-2", "ç", pdus(&[&format!("000100{DEST_DA}00080200E7")])),
        case("backtick needs UCS-2", "`", pdus(&[&format!("000100{DEST_DA}0008020060")])),
        case("U+001B is text, never an escape", "\u{1B}", pdus(&[&format!("000100{DEST_DA}000802001B")])),
        case(
            "curly apostrophe switches to UCS-2",
            "it’s",
            pdus(&[&format!("000100{DEST_DA}0008080069007420190073")]),
        ),
        case(
            "Cyrillic",
            "Привет",
            pdus(&[&format!("000100{DEST_DA}00080C041F04400438043204350442")]),
        ),
        case("Chinese", "你好", pdus(&[&format!("000100{DEST_DA}0008044F60597D")])),
        case(
            "emoji as a surrogate pair",
            "😀",
            pdus(&[&format!("000100{DEST_DA}000804D83DDE00")]),
        ),
        case(
            "every extension character",
            "€[]{}\\~^|\u{0C}",
            gsm(&[20]),
        ),
        case(
            "every default-alphabet character",
            "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà",
            gsm(&[127]),
        ),
        // GSM-7 boundaries.
        case("160 septets fit one SMS", rep("a", 160), gsm(&[160])),
        case("161 septets need two parts", rep("a", 161), gsm(&[153, 8])),
        case("306 septets fill two parts", rep("a", 306), gsm(&[153, 153])),
        case("307 septets need three parts", rep("a", 307), gsm(&[153, 153, 1])),
        case("158 + euro = 160 septets", rep("a", 158) + "€", gsm(&[160])),
        case("159 + euro = 161 septets", rep("a", 159) + "€", gsm(&[153, 8])),
        case(
            "escape would be the 153rd septet: move it to part 2",
            rep("a", 152) + "€" + &rep("b", 10),
            gsm(&[152, 12]),
        ),
        case(
            "extension character ends exactly at septet 153",
            rep("a", 151) + "€" + &rep("b", 10),
            gsm(&[153, 10]),
        ),
        // UCS-2 boundaries.
        case("70 UCS-2 units fit one SMS", rep("Ж", 70), ucs2(&[70])),
        case("71 UCS-2 units need two parts", rep("Ж", 71), ucs2(&[67, 4])),
        case("68 + emoji = 70 units in one SMS", rep("Ж", 68) + "😀", ucs2(&[70])),
        case("69 + emoji = 71 units", rep("Ж", 69) + "😀", ucs2(&[67, 4])),
        case(
            "emoji would straddle units 67/68: move it to part 2",
            rep("Ж", 66) + "😀" + &rep("Ж", 10),
            ucs2(&[66, 12]),
        ),
        case(
            "emoji ends exactly at unit 67",
            rep("Ж", 65) + "😀" + &rep("Ж", 10),
            ucs2(&[67, 10]),
        ),
        case("one emoji makes a long text UCS-2", rep("a", 100) + "😀", ucs2(&[67, 35])),
        // Part limits.
        case("10 full parts are allowed", rep("a", 1530), gsm(&[153; 10])),
        case("an 11th part is an error", rep("a", 1531), too_many(11, 10)),
        case("10 full UCS-2 parts are allowed", rep("Ж", 670), ucs2(&[67; 10])),
        case("an 11th UCS-2 part is an error", rep("Ж", 671), too_many(11, 10)),
        case("max_parts 1 allows a single SMS", rep("a", 160), gsm(&[160])).with(max_parts(1)),
        case("max_parts 1 rejects two parts", rep("a", 161), too_many(2, 1)).with(max_parts(1)),
        case("max_parts 0 rejects everything", "a", too_many(1, 0)).with(max_parts(0)),
        case("255 parts are possible", rep("a", 153 * 255), gsm(&[153; 255])).with(max_parts(255)),
        case(
            "256 parts cannot be numbered",
            rep("a", 153 * 255 + 1),
            too_many(256, 255),
        )
        .with(max_parts(255)),
        // Options on concatenated messages.
        case("concatenated with reference, VP and SRR", rep("z", 200), gsm(&[153, 47])).with(
            SubmitOptions {
                split: SplitOptions {
                    reference: 0xAB,
                    ..SplitOptions::default()
                },
                validity: Some(ValidityPeriod::at_least(Duration::from_secs(600))),
                request_status_report: true,
            },
        ),
        // Destinations.
        case("destination without +", "x", bad_destination("it does not start with +"))
            .to("46708251358"),
        case("destination is only +", "x", bad_destination("it has no digits")).to("+"),
        case(
            "destination with a letter",
            "x",
            bad_destination("it contains something other than digits after the +"),
        )
        .to("+4670825135a"),
        case(
            "destination with a space",
            "x",
            bad_destination("it contains something other than digits after the +"),
        )
        .to("+46 708251358"),
        case(
            "destination with 21 digits",
            "x",
            bad_destination("it has more than 20 digits"),
        )
        .to("+123456789012345678901"),
        case("destination with 20 digits", "x", gsm(&[1])).to("+12345678901234567890"),
    ]
}

#[test]
fn encoder_vectors() {
    for case in encoder_cases() {
        check(&case);
    }
}

#[test]
fn split_alone_matches_encoder_for_gateways() {
    // SMPP / Kannel callers use `split` without a destination; check the
    // concrete bytes they would send for a two-part GSM message.
    let text = rep("a", 152) + "€" + &rep("b", 10);
    let options = SplitOptions {
        reference: 0x42,
        ..SplitOptions::default()
    };
    let parts = split(&text, &options).expect("fits");
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0].udh, [0x05, 0x00, 0x03, 0x42, 0x02, 0x01]);
    assert_eq!(parts[1].udh, [0x05, 0x00, 0x03, 0x42, 0x02, 0x02]);
    let mut user_data = vec![0x1B, 0x65];
    user_data.extend([0x62; 10]);
    assert_eq!(parts[1].user_data, user_data);
    assert_eq!(parts[1].text, "€bbbbbbbbbb");
    let mut short_message = vec![0x05, 0x00, 0x03, 0x42, 0x02, 0x02];
    short_message.extend(&user_data);
    assert_eq!(parts[1].short_message(), short_message);
    assert_eq!(parts[1].esm_class(), 0x40);
    assert_eq!(parts[1].coding.smpp_data_coding(), 0x00);
    assert_eq!(parts[1].coding.kannel_coding(), 0);
    let emoji = split("😀", &SplitOptions::default()).expect("fits");
    assert_eq!(emoji[0].user_data, [0xD8, 0x3D, 0xDE, 0x00]);
    assert_eq!(emoji[0].coding.smpp_data_coding(), 0x08);
    assert_eq!(emoji[0].coding.kannel_coding(), 2);
    assert_eq!(emoji[0].esm_class(), 0x00);
}

/// A small deterministic generator so that the property test needs no
/// dependency and always checks the same texts.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn generated_texts_keep_every_invariant() {
    // Mostly GSM characters with extension characters sprinkled in, so that
    // boundaries land on escapes; some texts also get UCS-2 characters,
    // including surrogate pairs, so that boundaries land on pairs.
    const GSM: &[&str] = &["a", "Z", "0", " ", "@", "\n", "€", "[", "^", "|", "Ä", "§"];
    const OTHER: &[&str] = &["Ж", "你", "😀", "🇸🇪", "’", "ç"];
    let mut rng = XorShift(0x5EED_2303_8040);
    let options = SubmitOptions {
        split: SplitOptions {
            max_parts: 255,
            reference: 7,
        },
        ..SubmitOptions::default()
    };
    for _ in 0..1500 {
        let len = rng.below(700);
        let unicode = rng.below(3) == 0;
        let mut text = String::new();
        for _ in 0..len {
            if unicode && rng.below(4) == 0 {
                text.push_str(OTHER[rng.below(OTHER.len())]);
            } else {
                text.push_str(GSM[rng.below(GSM.len())]);
            }
        }
        let pdus = encode_submit(DEST, &text, &options).expect("within 255 parts");
        check_invariants("generated", DEST, &text, &options, &pdus);
    }
}

/// What a decoded PDU must contain.
struct Want {
    smsc: Option<&'static str>,
    destination: &'static str,
    coding: DataCoding,
    validity: Option<Validity>,
    udh: &'static str,
    concat: Option<Concat>,
    text: &'static str,
    tpdu_length: usize,
}

impl Default for Want {
    fn default() -> Self {
        Want {
            smsc: None,
            destination: DEST,
            coding: DataCoding::Gsm7,
            validity: None,
            udh: "",
            concat: None,
            text: "",
            tpdu_length: 0,
        }
    }
}

struct DecodeCase {
    name: &'static str,
    hex: String,
    expect: Result<Want, DecodeError>,
}

fn decoded(name: &'static str, hex: impl Into<String>, want: Want) -> DecodeCase {
    DecodeCase {
        name,
        hex: hex.into(),
        expect: Ok(want),
    }
}

fn rejected(name: &'static str, hex: impl Into<String>, error: DecodeError) -> DecodeCase {
    DecodeCase {
        name,
        hex: hex.into(),
        expect: Err(error),
    }
}

fn truncated(field: &'static str, offset: usize) -> DecodeError {
    DecodeError::Truncated { field, offset }
}

fn check_decode(case: &DecodeCase) {
    let name = case.name;
    let got = decode_submit_hex(&case.hex);
    match (&case.expect, got) {
        (Err(want), got) => {
            assert_eq!(
                got.as_ref().err(),
                Some(want),
                "{name}: expected an error, got {got:?}"
            );
            assert!(!want.to_string().is_empty());
        }
        (Ok(_), Err(e)) => panic!("{name}: unexpected error: {e}"),
        (Ok(want), Ok(d)) => {
            assert_eq!(d.smsc.as_deref(), want.smsc, "{name}: SMSC");
            assert_eq!(d.destination, want.destination, "{name}: destination");
            assert_eq!(d.coding, want.coding, "{name}: coding");
            assert_eq!(d.validity, want.validity, "{name}: validity");
            assert_eq!(to_hex(&d.udh), want.udh, "{name}: UDH");
            assert_eq!(d.concat, want.concat, "{name}: concatenation");
            assert_eq!(d.text, want.text, "{name}: text");
            assert_eq!(d.tpdu_length, want.tpdu_length, "{name}: TPDU length");
        }
    }
}

fn decoder_cases() -> Vec<DecodeCase> {
    let gsm_head = format!("000100{DEST_DA}0000");
    let udh_gsm_head = format!("004100{DEST_DA}0000");
    let ucs2_head = format!("000100{DEST_DA}0008");
    let udh_ucs2_head = format!("004100{DEST_DA}0008");
    vec![
        decoded(
            "dreamfabric SMS-SUBMIT",
            "0011000B916407281553F80000AA0AE8329BFD4697D9EC37",
            Want {
                validity: Some(Validity::Relative(ValidityPeriod::from_octet(0xAA))),
                text: "hellohello",
                tpdu_length: 23,
                ..Want::default()
            },
        ),
        decoded(
            "nordic +CMGS example with an SMSC (AT+CMGS=42)",
            NORDIC_CMGS,
            Want {
                smsc: Some("+448888888"),
                destination: "+358401234567",
                validity: Some(Validity::Relative(ValidityPeriod::from_octet(0x0B))),
                text: NORDIC_TEXT,
                tpdu_length: 42,
                ..Want::default()
            },
        ),
        // Neoway N11 AT command manual, AT+CMGS PDU example with SMSC length
        // 0: UCS-2 "hello" to a national (type 81) number, AT+CMGS=23.
        decoded(
            "neoway UCS-2 hello to a national number",
            "0001000B813124819396F300080A00680065006C006C006F",
            Want {
                destination: "13421839693",
                coding: DataCoding::Ucs2,
                text: "hello",
                tpdu_length: 23,
                ..Want::default()
            },
        ),
        decoded(
            "biradar concatenated part 1 of 3",
            BIRADAR_PART_1,
            Want {
                destination: "+919980136976",
                udh: "050003000301",
                concat: Some(Concat {
                    reference: 0,
                    total: 3,
                    sequence: 1,
                }),
                text: LOREM_153,
                tpdu_length: 153,
                ..Want::default()
            },
        ),
        // The alt.cellular.gsm Usenet thread "change sms id" works through
        // the TP-UDL/TP-UD "190A22080B912143658709F180B2CBE17919242FC3D979":
        // an 11-octet reply-address header, 3 fill bits, "Please reply".
        decoded(
            "usenet reply-address header with 3 fill bits",
            format!("{udh_gsm_head}190A22080B912143658709F180B2CBE17919242FC3D979"),
            Want {
                udh: "0A22080B912143658709F1",
                text: "Please reply",
                tpdu_length: 35,
                ..Want::default()
            },
        ),
        decoded(
            "16-bit concatenation reference",
            format!("{udh_ucs2_head}090608041234020100E9"),
            Want {
                coding: DataCoding::Ucs2,
                udh: "06080412340201",
                concat: Some(Concat {
                    reference: 0x1234,
                    total: 2,
                    sequence: 1,
                }),
                text: "é",
                tpdu_length: 22,
                ..Want::default()
            },
        ),
        decoded(
            "unknown extension code shows the default character",
            format!("{gsm_head}029B20"),
            Want {
                text: "A",
                tpdu_length: 15,
                ..Want::default()
            },
        ),
        decoded(
            "escape-escape shows a space",
            format!("{gsm_head}029B0D"),
            Want {
                text: " ",
                tpdu_length: 15,
                ..Want::default()
            },
        ),
        decoded(
            "class 0 (flash) GSM data coding",
            format!("000100{DEST_DA}001002E834"),
            Want {
                text: "hi",
                tpdu_length: 15,
                ..Want::default()
            },
        ),
        // TS 23.040 §9.1.2.5: an alphanumeric address counts its useful
        // semi-octets; 7 septets are 49 bits, so 13.
        decoded(
            "alphanumeric destination",
            "0001000DD0D43439ED3ECF01000002E834",
            Want {
                destination: "Tidings",
                text: "hi",
                tpdu_length: 16,
                ..Want::default()
            },
        ),
        decoded(
            "lower-case hex",
            "0011000b916407281553f80000aa0ae8329bfd4697d9ec37",
            Want {
                validity: Some(Validity::Relative(ValidityPeriod::from_octet(0xAA))),
                text: "hellohello",
                tpdu_length: 23,
                ..Want::default()
            },
        ),
        // Malformed input: clear errors, never a panic.
        rejected("empty", "", truncated("SMSC length", 0)),
        rejected("odd hex", "001", DecodeError::OddHexLength { length: 3 }),
        rejected("non-hex", "0X", DecodeError::InvalidHex { position: 1 }),
        rejected(
            "truncated address",
            "0011000B9164",
            truncated("destination address", 6),
        ),
        rejected(
            "truncated before TP-DCS",
            format!("001100{DEST_DA}00"),
            truncated("TP-DCS", 12),
        ),
        rejected(
            "truncated before TP-VP",
            format!("001100{DEST_DA}0000"),
            truncated("TP-VP", 13),
        ),
        rejected(
            "TP-UDL announces more than is there",
            "0011000B916407281553F80000AA0BE8329BFD4697D9EC37",
            truncated("user data", 24),
        ),
        rejected(
            "octets after the user data",
            "0011000B916407281553F80000AA0AE8329BFD4697D9EC3700",
            DecodeError::TrailingData { extra: 1 },
        ),
        rejected(
            "SMSC longer than 11 octets",
            "0C91",
            DecodeError::AddressTooLong {
                field: "SMSC address",
                length: 12,
            },
        ),
        rejected(
            "destination longer than 20 digits",
            "00010015",
            DecodeError::AddressTooLong {
                field: "destination address",
                length: 21,
            },
        ),
        rejected(
            "filler inside a destination",
            "0001000491F1320000",
            DecodeError::InvalidAddressDigit {
                field: "destination address",
                nibble: 0xF,
            },
        ),
        rejected(
            "an SMS-DELIVER is not an SMS-SUBMIT",
            "00040B916407281553F8",
            DecodeError::NotSubmit { mti: 0 },
        ),
        rejected(
            "8-bit data coding",
            format!("000100{DEST_DA}000401FF"),
            DecodeError::UnsupportedDataCoding { dcs: 0x04 },
        ),
        rejected(
            "compressed GSM text",
            format!("000100{DEST_DA}002001FF"),
            DecodeError::UnsupportedDataCoding { dcs: 0x20 },
        ),
        rejected(
            "GSM TP-UDL over 160",
            format!("{gsm_head}A1"),
            DecodeError::UserDataTooLong { udl: 161, max: 160 },
        ),
        rejected(
            "UCS-2 TP-UDL over 140",
            format!("{ucs2_head}8D"),
            DecodeError::UserDataTooLong { udl: 141, max: 140 },
        ),
        rejected(
            "UDHI with empty user data",
            format!("{udh_gsm_head}00"),
            DecodeError::InvalidUdh {
                reason: "TP-UDHI is set but the user data is empty",
            },
        ),
        rejected(
            "header length beyond the user data",
            format!("{udh_ucs2_head}020500"),
            DecodeError::InvalidUdh {
                reason: "the header length exceeds the user data",
            },
        ),
        rejected(
            "element beyond the header",
            format!("{udh_ucs2_head}0403000501"),
            DecodeError::InvalidUdh {
                reason: "an element runs past the end of the header",
            },
        ),
        rejected(
            "element without a length",
            format!("{udh_ucs2_head}020100"),
            DecodeError::InvalidUdh {
                reason: "an element has no length octet",
            },
        ),
        rejected(
            "GSM header longer than TP-UDL in septets",
            format!("{udh_gsm_head}0100"),
            DecodeError::InvalidUdh {
                reason: "the header is longer than TP-UDL",
            },
        ),
        rejected(
            "odd UCS-2 length",
            format!("{ucs2_head}03004100"),
            DecodeError::OddUcs2Length { length: 3 },
        ),
        rejected(
            "emoji split across parts leaves a lone surrogate",
            format!("{ucs2_head}02D83D"),
            DecodeError::UnpairedSurrogate,
        ),
        rejected(
            "extension character split across parts leaves an escape",
            format!("{gsm_head}011B"),
            DecodeError::DanglingEscape,
        ),
    ]
}

#[test]
fn decoder_vectors() {
    for case in decoder_cases() {
        check_decode(&case);
    }
}

#[test]
fn decoder_never_panics_on_damaged_pdus() {
    // Every strict prefix of a valid PDU must be an error (lengths are
    // checked exactly), and corrupting any octet must not panic.
    let mut samples: Vec<Vec<u8>> = decoder_cases()
        .into_iter()
        .filter(|c| c.expect.is_ok())
        .map(|c| tidings_sms::from_hex(&c.hex).expect("valid hex"))
        .collect();
    for text in ["hello €", "😀 Ж", &rep("a", 200), &rep("😀", 40)] {
        let pdus =
            encode_submit(DEST, text, &validity(ValidityPeriod::from_octet(1))).expect("encodes");
        samples.extend(pdus.into_iter().map(|p| p.bytes));
    }
    let mut rng = XorShift(42);
    for pdu in &samples {
        for len in 0..pdu.len() {
            assert!(
                decode_submit(&pdu[..len]).is_err(),
                "prefix of {len} decoded"
            );
        }
        for i in 0..pdu.len() {
            for value in [0x00, 0x01, 0x40, 0x7F, 0x80, 0xFF, rng.next() as u8] {
                let mut damaged = pdu.clone();
                damaged[i] = value;
                let _ = decode_submit(&damaged);
            }
        }
    }
    for _ in 0..20_000 {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = decode_submit(&bytes);
    }
}
