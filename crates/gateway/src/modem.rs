//! A GSM/LTE modem on a serial port, driven with AT commands in PDU mode (3GPP TS 27.005).
//!
//! Each send opens the port, checks that the modem answers (`AT`), turns echo off (`ATE0`),
//! selects PDU mode (`AT+CMGF=0`) and hands over each part with `AT+CMGS=<length>`, the
//! SMS-SUBMIT PDU from `tidings-sms` and Ctrl-Z. The port is closed again afterwards, so other
//! programs (or another profile) can use the modem between sends.
//!
//! A part the modem never received (no prompt, an error before the PDU was written) is safe to
//! send again; a part written without a `+CMGS` answer may have left, so it is never resent and
//! the send ends as [`SendError::Unknown`]. Serial I/O is blocking, so it runs on tokio's
//! blocking pool.
//!
//! [`receive`] reads the SMS the modem has stored: `AT+CMGL=4` lists every message in PDU mode,
//! each SMS-DELIVER is decoded with `tidings-sms` and deleted with `AT+CMGD`, so it is read once.
//! Polling this way needs no unsolicited `+CMTI` lines, which a port opened per use would miss.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tidings_sms::{SplitOptions, SubmitOptions};

use crate::{Received, SendError, Sent, Sms, MAX_RECEIVED};

/// Time allowed for the answer to a plain AT command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for the `> ` prompt after `AT+CMGS`.
const PROMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read waits before the deadline is checked again.
const POLL: Duration = Duration::from_millis(100);

fn default_baud() -> u32 {
    115_200
}

fn default_timeout() -> u64 {
    60
}

/// A modem, as the profile or server config holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModemConfig {
    /// The serial device, such as `/dev/ttyUSB0` or `/dev/ttyACM0`.
    pub port: PathBuf,
    /// Line speed in baud.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Seconds to wait for the network to take one part (`+CMGS`).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

/// Why a send stopped, before it is mapped onto a [`SendError`].
enum Failure {
    /// The modem did not take the part: sending it again is safe.
    NotSent(SendError),
    /// The part may have left.
    MaybeSent(String),
}

/// What the modem answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ok(Vec<String>),
    Prompt,
    Error(String),
    CmsError(u16),
    Timeout,
}

struct Modem {
    port: Box<dyn serialport::SerialPort>,
    buffer: Vec<u8>,
}

impl Modem {
    fn open(config: &ModemConfig) -> Result<Self, SendError> {
        let name = config.port.display().to_string();
        let port = serialport::new(name.as_str(), config.baud)
            .timeout(POLL)
            .open()
            .map_err(|e| match e.kind() {
                serialport::ErrorKind::NoDevice => SendError::Unavailable(format!(
                    "no modem at {name}: check that it is plugged in and the port is right"
                )),
                serialport::ErrorKind::Io(std::io::ErrorKind::NotFound) => SendError::Unavailable(
                    format!("no modem at {name}: check that it is plugged in and the port is right"),
                ),
                serialport::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
                    SendError::Unavailable(format!(
                        "no permission to open {name}: add this user to the port's group (often `dialout`)"
                    ))
                }
                _ => SendError::Unavailable(format!(
                    "cannot open the modem at {name} ({e}): it may be in use by another program such as ModemManager"
                )),
            })?;
        Ok(Self {
            port,
            buffer: Vec::new(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.port.write_all(bytes)?;
        self.port.flush()
    }

    /// Reads until a final answer (or the prompt, if `prompt`) or the deadline.
    fn answer(&mut self, timeout: Duration, prompt: bool) -> Answer {
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            if let Some(answer) = take_answer(&mut self.buffer, &mut lines, prompt) {
                return answer;
            }
            if Instant::now() >= deadline {
                return Answer::Timeout;
            }
            let mut chunk = [0u8; 256];
            match self.port.read(&mut chunk) {
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Answer::Timeout,
            }
        }
    }

    /// A plain command that must answer OK.
    fn command(&mut self, command: &str, what: &str) -> Result<(), SendError> {
        self.buffer.clear();
        self.write(format!("{command}\r").as_bytes())
            .map_err(|e| SendError::Unavailable(format!("cannot write to the modem: {e}")))?;
        match self.answer(COMMAND_TIMEOUT, false) {
            Answer::Ok(_) => Ok(()),
            Answer::Timeout => Err(SendError::Unavailable(format!(
                "the modem does not answer {what}: check the port, the baud rate and that no other program is using it"
            ))),
            Answer::CmsError(code) => Err(SendError::Unavailable(format!(
                "the modem refused {what} with +CMS ERROR {code} ({})",
                cms_text(code)
            ))),
            Answer::Error(line) => Err(SendError::Unavailable(format!(
                "the modem refused {what} ({line}): check that it has a SIM and is registered"
            ))),
            Answer::Prompt => Err(SendError::Unavailable("the modem is confused".into())),
        }
    }

    /// A command that must answer OK, with the information lines before the OK.
    fn listing(&mut self, command: &str) -> Result<Vec<String>, SendError> {
        self.buffer.clear();
        self.write(format!("{command}\r").as_bytes())
            .map_err(|e| SendError::Unavailable(format!("cannot write to the modem: {e}")))?;
        match self.answer(COMMAND_TIMEOUT, false) {
            Answer::Ok(lines) => Ok(lines),
            other => Err(SendError::Unavailable(format!(
                "the modem refused {command}: {other:?}"
            ))),
        }
    }

    /// One PDU with `AT+CMGS`.
    fn submit(&mut self, hex: &str, length: usize, timeout: Duration) -> Result<(), Failure> {
        self.buffer.clear();
        self.write(format!("AT+CMGS={length}\r").as_bytes())
            .map_err(|e| {
                Failure::NotSent(SendError::Unavailable(format!(
                    "cannot write to the modem: {e}"
                )))
            })?;
        match self.answer(PROMPT_TIMEOUT, true) {
            Answer::Prompt => {}
            Answer::CmsError(code) => return Err(Failure::NotSent(cms_error(code))),
            Answer::Timeout => {
                // ESC cancels a half-entered message, so that nothing is sent later by accident.
                let _ = self.write(&[0x1B]);
                return Err(Failure::NotSent(SendError::Unavailable(
                    "the modem did not ask for the message (no `>` prompt): it may be busy".into(),
                )));
            }
            other => {
                return Err(Failure::NotSent(SendError::Unavailable(format!(
                    "the modem refused AT+CMGS: {other:?}"
                ))))
            }
        }
        let mut body = hex.as_bytes().to_vec();
        body.push(0x1A);
        self.write(&body)
            .map_err(|e| Failure::MaybeSent(format!("writing the PDU failed: {e}")))?;
        match self.answer(timeout, false) {
            Answer::Ok(lines) if lines.iter().any(|l| l.starts_with("+CMGS:")) => Ok(()),
            Answer::Ok(_) => Err(Failure::MaybeSent(
                "the modem answered OK without +CMGS".into(),
            )),
            // The network or the modem refused the PDU: it was not sent.
            Answer::CmsError(code) => Err(Failure::NotSent(cms_error(code))),
            Answer::Error(line) => Err(Failure::NotSent(SendError::Unavailable(format!(
                "the modem refused the message ({line})"
            )))),
            Answer::Timeout | Answer::Prompt => Err(Failure::MaybeSent(format!(
                "no answer from the modem within {} s",
                timeout.as_secs()
            ))),
        }
    }
}

/// The stored messages an `AT+CMGL` answer lists: each `+CMGL: <index>,...` line and the PDU
/// line after it, decoded; an index whose PDU is not a readable SMS-DELIVER comes with `None`
/// (it is deleted all the same, so that it is not read again and again).
fn listed(lines: &[String]) -> Vec<(u32, Option<Received>)> {
    let mut out = Vec::new();
    let mut lines = lines.iter();
    while let Some(line) = lines.next() {
        let Some(fields) = line.strip_prefix("+CMGL:") else {
            continue;
        };
        let Some(index) = fields
            .split(',')
            .next()
            .and_then(|i| i.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let received = lines
            .next()
            .and_then(|pdu| tidings_sms::decode_deliver_hex(pdu.trim()).ok())
            .map(|deliver| Received {
                from: deliver.originator,
                text: deliver.text,
            });
        out.push((index, received));
        if out.len() >= MAX_RECEIVED {
            break;
        }
    }
    out
}

/// The received messages an `AT+CMGL` answer's lines list, as (index, sender, text); for the
/// fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn listed_in(lines: &[String]) -> Vec<(u32, Option<(String, String)>)> {
    listed(lines)
        .into_iter()
        .map(|(index, sms)| (index, sms.map(|sms| (sms.from, sms.text))))
        .collect()
}

/// Reads and deletes the SMS the modem has stored (see the module comment).
pub async fn receive(config: ModemConfig) -> Result<Vec<Received>, SendError> {
    tokio::task::spawn_blocking(move || {
        let mut modem = Modem::open(&config)?;
        modem.command("AT", "AT")?;
        modem.command("ATE0", "ATE0 (echo off)")?;
        modem.command("AT+CMGF=0", "AT+CMGF=0 (PDU mode)")?;
        let lines = modem.listing("AT+CMGL=4")?;
        let mut received = Vec::new();
        for (index, sms) in listed(&lines) {
            modem.command(&format!("AT+CMGD={index}"), "AT+CMGD (delete)")?;
            received.extend(sms);
        }
        Ok(received)
    })
    .await
    .map_err(|e| SendError::Unknown(format!("the modem task failed: {e}")))?
}

/// Takes the modem's final answer off the front of `buffer` (or the `>` prompt, if `prompt`),
/// keeping the information lines before it in `lines`; `None` while no answer is complete. No
/// I/O, so what a modem sends can be checked (and fuzzed) without one.
fn take_answer(buffer: &mut Vec<u8>, lines: &mut Vec<String>, prompt: bool) -> Option<Answer> {
    while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = buffer.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line).trim().to_string();
        if line.is_empty() {
            continue;
        }
        if line == "OK" {
            return Some(Answer::Ok(std::mem::take(lines)));
        }
        if let Some(code) = line.strip_prefix("+CMS ERROR:") {
            return Some(match code.trim().parse() {
                Ok(code) => Answer::CmsError(code),
                Err(_) => Answer::Error(line.clone()),
            });
        }
        if line == "ERROR"
            || line.starts_with("+CME ERROR:")
            || line == "NO CARRIER"
            || line == "BUSY"
        {
            return Some(Answer::Error(line));
        }
        lines.push(line);
    }
    if prompt
        && String::from_utf8_lossy(buffer)
            .trim_start()
            .starts_with('>')
    {
        buffer.clear();
        return Some(Answer::Prompt);
    }
    None
}

/// Every answer in `chunks`, read as they would arrive one after another, in their `Debug`
/// form; for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn answers_in(chunks: &[&[u8]], prompt: bool) -> Vec<String> {
    let mut buffer = Vec::new();
    let mut lines = Vec::new();
    let mut answers = Vec::new();
    for chunk in chunks {
        buffer.extend_from_slice(chunk);
        while let Some(answer) = take_answer(&mut buffer, &mut lines, prompt) {
            answers.push(format!("{answer:?}"));
        }
    }
    answers
}

/// What a `+CMS ERROR` code means (3GPP TS 27.005 §3.2.5 and TS 24.011 annex E).
fn cms_text(code: u16) -> &'static str {
    match code {
        1 => "unassigned number",
        8 => "operator determined barring",
        10 => "call barred",
        21 => "short message transfer rejected",
        27 => "destination out of service",
        28 => "unidentified subscriber",
        29 => "facility rejected",
        30 => "unknown subscriber",
        38 => "network out of order",
        41 => "temporary failure",
        42 => "congestion",
        47 => "resources unavailable",
        50 => "facility not subscribed",
        69 => "facility not implemented",
        96 => "invalid mandatory information",
        300 => "ME failure",
        301 => "SMS service of ME reserved",
        302 => "operation not allowed",
        303 => "operation not supported",
        304 => "invalid PDU mode parameter",
        310 => "SIM not inserted",
        311 => "SIM PIN required",
        313 => "SIM failure",
        314 => "SIM busy",
        316 => "SIM PUK required",
        320 => "memory failure",
        322 => "memory full",
        330 => "SMSC address unknown",
        331 => "no network service",
        332 => "network timeout",
        _ => "see the modem's manual",
    }
}

/// A `+CMS ERROR` as a [`SendError`]: refusals about the receiver or the message are final;
/// the rest (network, SIM, a busy modem) may pass, so the message is kept for a retry.
fn cms_error(code: u16) -> SendError {
    let text = format!("+CMS ERROR {code} ({})", cms_text(code));
    match code {
        1 | 8 | 10 | 21 | 28 | 29 | 30 | 50 | 69 | 96 | 303 | 304 => {
            SendError::Rejected(format!("the modem's network refused the SMS: {text}"))
        }
        310 | 311 | 313 | 316 => SendError::Unavailable(format!(
            "{text}: check the modem's SIM card (inserted, unlocked)"
        )),
        330 => SendError::Unavailable(format!("{text}: set the SIM's SMSC number with AT+CSCA")),
        _ => SendError::Unavailable(format!("the modem could not send now: {text}")),
    }
}

/// Sends one message through the modem.
pub async fn send(config: ModemConfig, sms: &Sms, split: &SplitOptions) -> Result<Sent, SendError> {
    let options = SubmitOptions {
        split: split.clone(),
        ..SubmitOptions::default()
    };
    let pdus = tidings_sms::encode_submit(&sms.to, &sms.text, &options)
        .map_err(|e| SendError::Rejected(e.to_string()))?;
    let timeout = Duration::from_secs(config.timeout_seconds.max(1));
    tokio::task::spawn_blocking(move || {
        let mut modem = Modem::open(&config)?;
        modem.command("AT", "AT")?;
        modem.command("ATE0", "ATE0 (echo off)")?;
        modem.command("AT+CMGF=0", "AT+CMGF=0 (PDU mode)")?;
        let total = pdus.len();
        for (index, pdu) in pdus.iter().enumerate() {
            match modem.submit(&pdu.hex, pdu.tpdu_length, timeout) {
                Ok(()) => {}
                Err(Failure::NotSent(e)) if index == 0 => return Err(e),
                Err(Failure::NotSent(e)) => {
                    return Err(SendError::Unknown(format!(
                        "{e}; {index} of {total} parts had already been sent, so the message is \
                         not sent again (the receiver may see an incomplete message)"
                    )))
                }
                Err(Failure::MaybeSent(reason)) => {
                    return Err(SendError::Unknown(format!(
                        "part {} of {total} may or may not have been sent ({reason}); it is \
                         not sent again so that it cannot arrive twice",
                        index + 1
                    )))
                }
            }
        }
        Ok(Sent {
            parts: total,
            receipt: None,
        })
    })
    .await
    .map_err(|e| SendError::Unknown(format!("the modem task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer `take_answer` reads from `input`, and what it leaves in the buffer.
    fn check(input: &str, prompt: bool, expected: Option<Answer>, left: &str) {
        let mut buffer = input.as_bytes().to_vec();
        let mut lines = Vec::new();
        assert_eq!(
            take_answer(&mut buffer, &mut lines, prompt),
            expected,
            "{input:?}"
        );
        assert_eq!(String::from_utf8_lossy(&buffer), left, "{input:?}");
    }

    #[test]
    fn stored_messages_are_listed_with_their_index() {
        let lines: Vec<String> = [
            "+CMGL: 3,0,,24",
            "07911326040000F0040B911346610089F60000208062917314080CC8F71D14969741F977FD07",
            "+CMGL: 5,0,,3",
            "00FF",
            "+CMGL: x,0,,3",
            "stray",
        ]
        .iter()
        .map(|l| l.to_string())
        .collect();
        let got = listed(&lines);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, 3);
        let first = got[0].1.as_ref().expect("the first decodes");
        assert_eq!(
            (first.from.as_str(), first.text.as_str()),
            ("+31641600986", "How are you?")
        );
        // An unreadable PDU is listed for deletion, with nothing received.
        assert_eq!((got[1].0, got[1].1.is_none()), (5, true));
    }

    #[test]
    fn answers_are_read_off_the_buffer() {
        check("\r\nOK\r\n", false, Some(Answer::Ok(Vec::new())), "");
        check(
            "\r\n+CMGS: 12\r\n\r\nOK\r\nrest",
            false,
            Some(Answer::Ok(vec!["+CMGS: 12".into()])),
            "rest",
        );
        check(
            "\r\n+CMS ERROR: 330\r\n",
            false,
            Some(Answer::CmsError(330)),
            "",
        );
        check(
            "+CMS ERROR: 99999\r\n",
            false,
            Some(Answer::Error("+CMS ERROR: 99999".into())),
            "",
        );
        check(
            "+CME ERROR: 10\r\n",
            false,
            Some(Answer::Error("+CME ERROR: 10".into())),
            "",
        );
        check("\r\n> ", true, Some(Answer::Prompt), "");
        check("\r\n> ", false, None, "> ");
        check("+CMGS: 1", false, None, "+CMGS: 1");
        check("\u{ff}\u{0}OK\r\n", false, None, "");
    }
}
