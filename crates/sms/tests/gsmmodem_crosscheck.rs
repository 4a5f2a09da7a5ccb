//! Cross-check against an independent implementation: `gsmmodem.pdu` from
//! the PyPI package `python-gsmmodem-new`, driven through
//! `tests/gsmmodem_crosscheck.py`.
//!
//! (a) gsmmodem decodes every PDU we produce; number, text, header and
//!     lengths must match ours. (b) gsmmodem encodes the same texts; our
//!     decoder must read its PDUs back to the same text, and where both
//!     sides are deterministic (reference 0, no status report) the bytes
//!     must be identical. Each case states where gsmmodem is known to differ
//!     and why, and the test fails if a difference appears or disappears.
//!
//! This test fails (it never skips) when `python3` or the module is missing:
//! CI must run `pip install python-gsmmodem-new` first. Set
//! `TIDINGS_SMS_PYTHON` to use another interpreter (e.g. a virtualenv's).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use tidings_sms::{
    decode_submit_hex, encode_submit, DecodedSubmit, SubmitOptions, SubmitPdu, ValidityPeriod,
};

/// What gsmmodem's decoder makes of our PDUs.
enum Reads {
    /// Exactly our text, part by part.
    Same,
    /// This text instead, for the reason given.
    As(String, &'static str),
}

/// What gsmmodem's encoder produces for the same text.
enum Writes {
    /// Byte-for-byte our PDUs.
    SameBytes,
    /// Different bytes that our decoder reads as the same text.
    SameText(&'static str),
    /// PDUs that our decoder reads as this other text.
    ReadsAs(String, &'static str),
    /// An exception whose message contains the first string.
    Fails(&'static str, &'static str),
}

struct Cross {
    name: &'static str,
    number: &'static str,
    text: String,
    validity_minutes: Option<u64>,
    reads: Reads,
    writes: Writes,
}

const NUMBER: &str = "+46708251358";

fn cross(name: &'static str, text: impl Into<String>) -> Cross {
    Cross {
        name,
        number: NUMBER,
        text: text.into(),
        validity_minutes: None,
        reads: Reads::Same,
        writes: Writes::SameBytes,
    }
}

impl Cross {
    fn to(mut self, number: &'static str) -> Self {
        self.number = number;
        self
    }
    fn valid_for(mut self, minutes: u64) -> Self {
        self.validity_minutes = Some(minutes);
        self
    }
    fn reads(mut self, reads: Reads) -> Self {
        self.reads = reads;
        self
    }
    fn writes(mut self, writes: Writes) -> Self {
        self.writes = writes;
        self
    }
    fn options(&self) -> SubmitOptions {
        SubmitOptions {
            validity: self
                .validity_minutes
                .map(|m| ValidityPeriod::at_least(Duration::from_secs(m * 60))),
            ..SubmitOptions::default()
        }
    }
}

/// gsmmodem's extension table maps the key chr(0xFF) to the integer 0x0A
/// instead of form feed to 0x0A, so it sends a form feed as UCS-2 and drops
/// the escape pair 1B 0A when reading (TS 23.038 §6.2.1.1 has FF at 1B 0A).
const FORM_FEED_BUG: &str = "gsmmodem has no working form feed in its extension table";
/// gsmmodem's default alphabet has ` at 0x5F where TS 23.038 §6.2.1 has §
/// (` is not in the GSM default alphabet at all, so we send it as UCS-2).
const SECTION_SIGN_BUG: &str = "gsmmodem maps 0x5F to ` instead of §";
/// gsmmodem's encodeUcs2 writes each code point as two octets, which fails
/// above U+FFFF instead of writing a surrogate pair; its UCS-2 splitting also
/// counts code points, not UTF-16 units.
const NO_SURROGATES: &str = "gsmmodem cannot encode characters outside the BMP";

fn rep(s: &str, n: usize) -> String {
    s.repeat(n)
}

fn cases() -> Vec<Cross> {
    vec![
        cross("hellohello", "hellohello"),
        cross("hellohello, 4 days", "hellohello").valid_for(4 * 24 * 60),
        cross(
            "verification code, 10 minutes",
            "Your Tidings code is 493817. It expires in 10 minutes.",
        )
        .valid_for(10),
        cross("even number of digits", "hello").to("+447700900123"),
        cross("empty", ""),
        cross("at signs", "user@example.com @@"),
        cross("eight septets ending in @", "abcdefg@").reads(Reads::As(
            "abcdefg".into(),
            "gsmmodem's unpackSeptets drops a final septet that is 0 (@) when the \
             septets exactly fill the octets; the bytes are identical, and gsmmodem \
             loses the @ from its own PDU too",
        )),
        cross("extension characters", "Price: 5€ [a] {b} \\ ~ ^ |"),
        cross("form feed", "page1\u{0C}page2")
            .reads(Reads::As("page1page2".into(), FORM_FEED_BUG))
            .writes(Writes::SameText(FORM_FEED_BUG)),
        cross("section sign", "§ 5")
            .reads(Reads::As("` 5".into(), SECTION_SIGN_BUG))
            .writes(Writes::SameText(SECTION_SIGN_BUG)),
        cross("backtick", "`code`").writes(Writes::ReadsAs("§code§".into(), SECTION_SIGN_BUG)),
        cross("c cedilla", "Ç ç"),
        cross("Cyrillic", "Привет, мир!"),
        cross("Chinese", "你好，世界"),
        cross("emoji", "Hi 😀").writes(Writes::Fails("byte must be in range", NO_SURROGATES)),
        cross("161 septets", rep("a", 161)),
        cross("long GSM", rep("The quick brown fox. ", 20)),
        cross(
            "escape at the part boundary",
            rep("a", 152) + "€" + &rep("b", 200),
        ),
        cross("70 UCS-2 units", rep("Ж", 70)),
        cross("71 UCS-2 units", rep("Ж", 71)),
        cross("long UCS-2", rep("Жизнь ", 25)),
        cross(
            "emoji at the part boundary",
            rep("Ж", 66) + "😀" + &rep("Ж", 10),
        )
        .writes(Writes::Fails("byte must be in range", NO_SURROGATES)),
    ]
}

#[test]
fn gsmmodem_agrees() {
    let cases = cases();
    let ours: Vec<Vec<SubmitPdu>> = cases
        .iter()
        .map(|c| {
            encode_submit(c.number, &c.text, &c.options())
                .unwrap_or_else(|e| panic!("{}: we cannot encode it: {e}", c.name))
        })
        .collect();

    let reply = run_gsmmodem(&request(&cases, &ours));
    let decoded = reply.get("decoded").array();
    let encoded = reply.get("encoded").array();
    assert_eq!(decoded.len(), cases.len());
    assert_eq!(encoded.len(), cases.len());

    let mut failures = Vec::new();
    for ((case, pdus), (theirs_decoded, theirs_encoded)) in
        cases.iter().zip(&ours).zip(decoded.iter().zip(encoded))
    {
        if let Err(e) = check_their_decoding(case, pdus, theirs_decoded) {
            failures.push(format!("{} (gsmmodem decoding our PDUs): {e}", case.name));
        }
        if let Err(e) = check_their_encoding(case, pdus, theirs_encoded) {
            failures.push(format!(
                "{} (our decoding of gsmmodem's PDUs): {e}",
                case.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cross-check failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// (a) gsmmodem reads our PDUs.
fn check_their_decoding(case: &Cross, ours: &[SubmitPdu], reply: &Json) -> Result<(), String> {
    if let Some(error) = reply.field("error") {
        return Err(format!("gsmmodem raised {}", error.str()));
    }
    let parts = reply.get("parts").array();
    if parts.len() != ours.len() {
        return Err(format!("{} parts, we made {}", parts.len(), ours.len()));
    }
    let total = ours.len();
    let mut text = String::new();
    for (i, (part, pdu)) in parts.iter().zip(ours).enumerate() {
        let number = part.get("number").str();
        if number != case.number {
            return Err(format!("part {i}: number {number:?}"));
        }
        let tpdu_length = part.get("tpdu_length").int();
        if tpdu_length != pdu.tpdu_length as i64 {
            return Err(format!(
                "part {i}: TPDU length {tpdu_length}, ours {}",
                pdu.tpdu_length
            ));
        }
        let validity = part.get("validity_seconds").opt_int();
        let our_validity = case
            .options()
            .validity
            .map(|v| v.duration().as_secs() as i64);
        if validity != our_validity {
            return Err(format!(
                "part {i}: validity {validity:?}, ours {our_validity:?}"
            ));
        }
        let udh = part.get("udh").array();
        if total == 1 {
            if !udh.is_empty() {
                return Err(format!("single part has a UDH: {udh:?}"));
            }
        } else {
            let [ie] = udh else {
                return Err(format!("part {i}: expected one UDH element, got {udh:?}"));
            };
            let got = (
                ie.get("iei").int(),
                ie.get("reference").int(),
                ie.get("parts").int(),
                ie.get("number").int(),
            );
            if got != (0, 0, total as i64, i as i64 + 1) {
                return Err(format!("part {i}: concatenation element {got:?}"));
            }
        }
        let part_text = part.get("text").str();
        if matches!(case.reads, Reads::Same) && part_text != pdu.part.text {
            return Err(format!(
                "part {i}: text {part_text:?}, ours {:?}",
                pdu.part.text
            ));
        }
        text.push_str(part_text);
    }
    let (want, why) = match &case.reads {
        Reads::Same => (case.text.as_str(), "it should read our text"),
        Reads::As(other, why) => (other.as_str(), *why),
    };
    if text != want {
        return Err(format!("read {text:?}, expected {want:?} ({why})"));
    }
    Ok(())
}

/// (b) we read gsmmodem's PDUs, and compare bytes where we expect equality.
fn check_their_encoding(case: &Cross, ours: &[SubmitPdu], reply: &Json) -> Result<(), String> {
    if let Some(error) = reply.field("error") {
        let error = error.str();
        return match case.writes {
            Writes::Fails(expected, _) if error.contains(expected) => Ok(()),
            Writes::Fails(expected, why) => Err(format!(
                "gsmmodem raised {error:?}, expected one containing {expected:?} ({why})"
            )),
            _ => Err(format!("gsmmodem raised {error}")),
        };
    }
    if let Writes::Fails(_, why) = case.writes {
        return Err(format!(
            "gsmmodem now encodes this text; it used to fail ({why}): update the expectation"
        ));
    }
    let pdus = reply.get("pdus").array();
    let hexes: Vec<&str> = pdus.iter().map(|p| p.get("hex").str()).collect();
    let mut decoded: Vec<DecodedSubmit> = Vec::new();
    for (i, p) in pdus.iter().enumerate() {
        let d = decode_submit_hex(p.get("hex").str())
            .map_err(|e| format!("part {i} does not decode: {e}"))?;
        if d.destination != case.number {
            return Err(format!("part {i}: destination {:?}", d.destination));
        }
        let tpdu_length = p.get("tpdu_length").int();
        if tpdu_length != d.tpdu_length as i64 {
            return Err(format!(
                "part {i}: gsmmodem says TPDU length {tpdu_length}, the PDU has {}",
                d.tpdu_length
            ));
        }
        let expected_concat = (pdus.len() > 1).then(|| (pdus.len() as i64, i as i64 + 1));
        let concat = d
            .concat
            .map(|c| (i64::from(c.total), i64::from(c.sequence)));
        if concat != expected_concat {
            return Err(format!("part {i}: concatenation {:?}", d.concat));
        }
        decoded.push(d);
    }
    let text: String = decoded.iter().map(|d| d.text.as_str()).collect();
    let our_hexes: Vec<&str> = ours.iter().map(|p| p.hex.as_str()).collect();
    match &case.writes {
        Writes::SameBytes => {
            if hexes != our_hexes {
                return Err(format!(
                    "bytes differ:\n  gsmmodem {hexes:?}\n  ours     {our_hexes:?}"
                ));
            }
            if text != case.text {
                return Err(format!("read {text:?}"));
            }
        }
        Writes::SameText(why) => {
            if hexes == our_hexes {
                return Err(format!(
                    "bytes are now identical; they used to differ ({why}): update the expectation"
                ));
            }
            if text != case.text {
                return Err(format!("read {text:?} ({why})"));
            }
        }
        Writes::ReadsAs(other, why) => {
            if text != *other {
                return Err(format!("read {text:?}, expected {other:?} ({why})"));
            }
        }
        Writes::Fails(..) => unreachable!("handled above"),
    }
    Ok(())
}

/// The JSON request for the script. Everything non-ASCII is escaped so that
/// the script's standard input is ASCII whatever the locale.
fn request(cases: &[Cross], ours: &[Vec<SubmitPdu>]) -> String {
    let decode: Vec<String> = cases
        .iter()
        .zip(ours)
        .map(|(c, pdus)| {
            let hexes: Vec<String> = pdus.iter().map(|p| json_string(&p.hex)).collect();
            format!(
                "{{\"name\":{},\"pdus\":[{}]}}",
                json_string(c.name),
                hexes.join(",")
            )
        })
        .collect();
    let encode: Vec<String> = cases
        .iter()
        .map(|c| {
            format!(
                "{{\"name\":{},\"number\":{},\"text\":{},\"validity_minutes\":{}}}",
                json_string(c.name),
                json_string(c.number),
                json_string(&c.text),
                c.validity_minutes
                    .map_or_else(|| "null".to_owned(), |m| m.to_string())
            )
        })
        .collect();
    format!(
        "{{\"decode\":[{}],\"encode\":[{}]}}",
        decode.join(","),
        encode.join(",")
    )
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

fn run_gsmmodem(request: &str) -> Json {
    let python = std::env::var("TIDINGS_SMS_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/gsmmodem_crosscheck.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {python:?} ({e}). This cross-check needs Python 3 with the \
                 independent implementation installed: pip install python-gsmmodem-new"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(request.as_bytes())
        .expect("write the request to the script");
    let output = child.wait_with_output().expect("wait for the script");
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "the gsmmodem module is missing, so the cross-check cannot run.\n{stderr}\
             CI must run: pip install python-gsmmodem-new"
        ),
        _ => panic!("{script} failed with {}:\n{stderr}", output.status),
    }
    let stdout = String::from_utf8(output.stdout).expect("the script prints ASCII JSON");
    Json::parse(&stdout).unwrap_or_else(|e| panic!("bad JSON from the script ({e}): {stdout}"))
}

/// Just enough JSON to read the script's reply, so that the crate keeps its
/// promise of no dependencies beyond `thiserror`.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Result<Json, String> {
        let mut p = Parser {
            bytes: text.as_bytes(),
            pos: 0,
        };
        let value = p.value()?;
        p.ws();
        if p.pos != p.bytes.len() {
            return Err(format!("trailing data at {}", p.pos));
        }
        Ok(value)
    }

    fn field(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get(&self, key: &str) -> &Json {
        self.field(key)
            .unwrap_or_else(|| panic!("no {key:?} in {self:?}"))
    }

    fn array(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            other => panic!("expected an array, got {other:?}"),
        }
    }

    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }

    fn int(&self) -> i64 {
        match self {
            Json::Int(n) => *n,
            other => panic!("expected an integer, got {other:?}"),
        }
    }

    fn opt_int(&self) -> Option<i64> {
        match self {
            Json::Null => None,
            other => Some(other.int()),
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.bytes[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.bytes.get(self.pos) {
            Some(b'{') => {
                self.pos += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return Err(format!("expected : at {}", self.pos));
                    }
                    fields.push((key, self.value()?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Object(fields));
                    }
                    if !self.eat(",") {
                        return Err(format!("expected , or }} at {}", self.pos));
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Array(items));
                    }
                    if !self.eat(",") {
                        return Err(format!("expected , or ] at {}", self.pos));
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') if self.eat("true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Json::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(Json::Null),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.pos;
                self.pos += 1;
                while matches!(self.bytes.get(self.pos), Some(b'0'..=b'9')) {
                    self.pos += 1;
                }
                let digits =
                    std::str::from_utf8(&self.bytes[start..self.pos]).map_err(|e| e.to_string())?;
                digits
                    .parse()
                    .map(Json::Int)
                    .map_err(|e| format!("{e} at {start}"))
            }
            _ => Err(format!("unexpected input at {}", self.pos)),
        }
    }

    fn hex4(&mut self) -> Result<u16, String> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .ok_or("short \\u escape")?;
        self.pos += 4;
        u16::from_str_radix(digits, 16).map_err(|e| e.to_string())
    }

    fn string(&mut self) -> Result<String, String> {
        if !self.eat("\"") {
            return Err(format!("expected a string at {}", self.pos));
        }
        let mut units: Vec<u16> = Vec::new();
        loop {
            let b = *self.bytes.get(self.pos).ok_or("unterminated string")?;
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let e = *self.bytes.get(self.pos).ok_or("unterminated escape")?;
                    self.pos += 1;
                    match e {
                        b'u' => units.push(self.hex4()?),
                        b'n' => units.push(0x0A),
                        b'r' => units.push(0x0D),
                        b't' => units.push(0x09),
                        b'b' => units.push(0x08),
                        b'f' => units.push(0x0C),
                        b'"' | b'\\' | b'/' => units.push(u16::from(e)),
                        _ => return Err(format!("bad escape at {}", self.pos)),
                    }
                }
                // The script writes ASCII only (ensure_ascii=True).
                0x20..=0x7E => units.push(u16::from(b)),
                _ => return Err(format!("unexpected byte {b:#x} at {}", self.pos)),
            }
        }
        String::from_utf16(&units).map_err(|e| e.to_string())
    }
}
