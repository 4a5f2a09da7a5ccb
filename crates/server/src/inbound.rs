//! Registration by the user's own SMS (mobile-originated): the declarations that wait for it.
//!
//! A client declares its number and gets a short code; the user's phone texts the code to the
//! service number; the server's inbound side (`receiver`) hands each SMS here under the pseudonym
//! of the number the operator's network says sent it. A declaration is kept under its number's
//! pseudonym, so an SMS proves only the number it came from: the right code sent from another
//! number finds no declaration there (or that number's own, which counts it as a wrong attempt).
//! No SMS leaves at the service's cost.
//!
//! Codes are kept as keyed hashes (the caller's `code_hash`), never in clear. Everything here is
//! in memory only and bounded ([`MAX_DECLARATIONS`], [`DECLARATIONS_PER_NUMBER`]); a restart
//! forgets it, and the user declares again.
//!
//! With several nodes, a number's declaration is kept by one node, the number's *declaration
//! owner* (rendezvous hashing over its pseudonym, [`crate::bus::Bus::declaration_owner`]): the
//! declaration, the SMS (which reaches whichever node the operator's gateway calls) and the
//! completion (at whichever node the client reaches) are each asked there over the bus
//! ([`ask`]), carrying the pseudonym and the code's keyed hash only. Alone, with the bus down or
//! the owner silent, a node answers from its own table.

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng as _;
use subtle::ConstantTimeEq as _;
use tidings_core::limits::Window;
use tidings_core::{Millis, HOUR, MINUTE};
use tidings_store::Pseudonym;
use tokio::sync::Notify;

/// Characters of a code: Crockford's base 32 (no I, L, O or U, which read like 1, 1, 0 and V).
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code: 8 of 32, 40 bits.
pub const CODE_LENGTH: usize = 8;
/// The word the SMS starts with, before the code.
pub const KEYWORD: &str = "TIDINGS";
/// Most declarations kept at once; past it, expired ones are forgotten first.
pub const MAX_DECLARATIONS: usize = 100_000;
/// Declarations one number may make: a new one replaces the last, so this bounds how often
/// someone else can spoil a number's pending registration.
pub const DECLARATIONS_PER_NUMBER: Window = Window {
    max: 5,
    period: HOUR,
};
/// How long an expired declaration is remembered, so that a late client hears "expired" rather
/// than "no code".
const EXPIRED_KEPT: Millis = 30 * MINUTE;

/// A fresh code, drawn from the OS's generator, in the form the client sends back.
pub fn new_code() -> String {
    let mut rng = rand::rngs::OsRng;
    (0..CODE_LENGTH)
        .map(|_| char::from(CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())]))
        .collect()
}

/// The code as people read it: two groups of four.
pub fn display(code: &str) -> String {
    let (first, second) = code.split_at(code.len().min(CODE_LENGTH / 2));
    format!("{first}-{second}")
}

/// The text the user's phone sends, prefilled: it says what sending it does, so that someone
/// talked into sending another person's code is warned.
pub fn sms_text(code: &str) -> String {
    format!(
        "{KEYWORD} {} registers this number with Tidings and signs out its other devices",
        display(code)
    )
}

/// A code as typed or texted, in its one form: upper case, without the dash and spaces, with
/// the letters that read like digits taken as those digits. `None` if it is not a code.
pub fn normalize(text: &str) -> Option<String> {
    let code: String = text
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect();
    (code.len() == CODE_LENGTH && code.bytes().all(|b| CODE_ALPHABET.contains(&b))).then_some(code)
}

/// The code in an SMS: the characters after the word [`KEYWORD`] (any case), dashes and spaces
/// skipped. `None` when there is none.
pub fn code_in_sms(text: &str) -> Option<String> {
    let upper = text.to_ascii_uppercase();
    let start = upper.find(KEYWORD)? + KEYWORD.len();
    let mut code = String::new();
    for c in text.get(start..)?.chars() {
        match c {
            '-' | ' ' | '\t' | ':' if code.len() < CODE_LENGTH => {}
            c if c.is_ascii_alphanumeric() && code.len() < CODE_LENGTH => code.push(c),
            _ => break,
        }
    }
    normalize(&code)
}

/// One number's pending registration.
#[derive(Debug, Clone)]
struct Declaration {
    hash: [u8; 32],
    expires_at: Millis,
    /// Wrong codes so far, by SMS or by the client.
    attempts: u32,
    /// Whether the SMS with the code arrived from the number.
    received: bool,
}

#[derive(Debug, Default)]
struct Entry {
    declaration: Option<Declaration>,
    /// When the number declared, over [`DECLARATIONS_PER_NUMBER`].
    declared_at: Vec<Millis>,
}

/// Why a declaration was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The number declared too often; the milliseconds to wait.
    TooOften(Millis),
    /// Too many declarations are pending in all.
    Full,
}

/// What an SMS did to the declaration of the number it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// The code is right: the number is proven.
    Accepted,
    /// The code is wrong; it counted as an attempt.
    Wrong,
    /// The number has no declaration (never made, completed or replaced).
    NoDeclaration,
    /// The declaration expired, or its attempts are used up.
    Spent,
}

/// How an attempt to complete went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// The SMS arrived and the code matches: the declaration is consumed.
    Done,
    /// The code matches but the SMS has not arrived yet.
    Waiting,
    /// The code is wrong; this many attempts are left.
    Wrong { attempts_left: u32 },
    /// No declaration for the number.
    NoDeclaration,
    /// The declaration expired.
    Expired,
    /// The attempts are used up.
    TooManyAttempts,
}

/// The pending declarations, by number pseudonym.
#[derive(Debug)]
pub struct Declarations {
    entries: Mutex<HashMap<Pseudonym, Entry>>,
    /// Woken whenever an SMS proves a number, for the clients waiting to complete.
    arrived: Notify,
    max_attempts: u32,
}

impl Declarations {
    /// An empty table; each declaration allows `max_attempts` wrong codes.
    pub fn new(max_attempts: u32) -> Self {
        Self {
            entries: Mutex::default(),
            arrived: Notify::new(),
            max_attempts,
        }
    }

    /// Woken when an SMS proves a number: register interest before checking, then wait.
    pub fn arrival(&self) -> &Notify {
        &self.arrived
    }

    /// Records a declaration with the keyed hash of its code, replacing the number's earlier one.
    pub fn declare(
        &self,
        pseudonym: Pseudonym,
        hash: [u8; 32],
        ttl: Millis,
        now: Millis,
    ) -> Result<(), Refused> {
        let Ok(mut entries) = self.entries.lock() else {
            return Err(Refused::Full);
        };
        if entries.len() >= MAX_DECLARATIONS && !entries.contains_key(&pseudonym) {
            prune_entries(&mut entries, now);
            if entries.len() >= MAX_DECLARATIONS {
                return Err(Refused::Full);
            }
        }
        let entry = entries.entry(pseudonym).or_default();
        DECLARATIONS_PER_NUMBER
            .check(&entry.declared_at, now)
            .map_err(Refused::TooOften)?;
        DECLARATIONS_PER_NUMBER.prune(&mut entry.declared_at, now);
        entry.declared_at.push(now);
        entry.declaration = Some(Declaration {
            hash,
            expires_at: now + ttl,
            attempts: 0,
            received: false,
        });
        Ok(())
    }

    /// An SMS from the number with this pseudonym carried a code with this keyed hash.
    pub fn hear(&self, pseudonym: &Pseudonym, presented: &[u8; 32], now: Millis) -> Heard {
        let Ok(mut entries) = self.entries.lock() else {
            return Heard::NoDeclaration;
        };
        let Some(declaration) = entries
            .get_mut(pseudonym)
            .and_then(|entry| entry.declaration.as_mut())
        else {
            return Heard::NoDeclaration;
        };
        if declaration.expires_at <= now || declaration.attempts >= self.max_attempts {
            return Heard::Spent;
        }
        if bool::from(declaration.hash.ct_eq(presented)) {
            declaration.received = true;
            drop(entries);
            self.arrived.notify_waiters();
            return Heard::Accepted;
        }
        declaration.attempts += 1;
        Heard::Wrong
    }

    /// The client presents the code: consumed when its SMS has arrived, charged when wrong.
    pub fn complete(&self, pseudonym: &Pseudonym, presented: &[u8; 32], now: Millis) -> Completion {
        let Ok(mut entries) = self.entries.lock() else {
            return Completion::NoDeclaration;
        };
        let Some(entry) = entries.get_mut(pseudonym) else {
            return Completion::NoDeclaration;
        };
        let Some(declaration) = entry.declaration.as_mut() else {
            return Completion::NoDeclaration;
        };
        if declaration.expires_at <= now {
            return Completion::Expired;
        }
        if declaration.attempts >= self.max_attempts {
            return Completion::TooManyAttempts;
        }
        if !bool::from(declaration.hash.ct_eq(presented)) {
            declaration.attempts += 1;
            let attempts_left = self.max_attempts - declaration.attempts;
            if attempts_left == 0 {
                return Completion::TooManyAttempts;
            }
            return Completion::Wrong { attempts_left };
        }
        if !declaration.received {
            return Completion::Waiting;
        }
        entry.declaration = None;
        Completion::Done
    }

    /// Forgets what no longer matters, so that memory follows activity.
    pub fn prune(&self, now: Millis) {
        if let Ok(mut entries) = self.entries.lock() {
            prune_entries(&mut entries, now);
        }
    }
}

/// What is asked of a number's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Record a declaration for `ttl`.
    Declare { ttl: Millis },
    /// An SMS from the number carried the code.
    Hear,
    /// The client presents the code.
    Complete,
}

/// What a question about a declaration came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Declared(Result<(), Refused>),
    Heard(Heard),
    Completed(Completion),
}

/// One question, as it crosses the bus: what is asked, of which number's declaration, with
/// which code's keyed hash, at what time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Question {
    pub asked: Asked,
    pub pseudonym: Pseudonym,
    pub presented: [u8; 32],
    pub now: Millis,
}

impl Question {
    /// The question as the bus carries it: what (1 declare, 2 hear, 3 complete) ‖ pseudonym ‖
    /// hash ‖ time ‖ for a declaration its lifetime.
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 32 + 32 + 8 + 8);
        out.push(match self.asked {
            Asked::Declare { .. } => 1,
            Asked::Hear => 2,
            Asked::Complete => 3,
        });
        out.extend_from_slice(&self.pseudonym.0);
        out.extend_from_slice(&self.presented);
        out.extend_from_slice(&self.now.to_be_bytes());
        if let Asked::Declare { ttl } = self.asked {
            out.extend_from_slice(&ttl.to_be_bytes());
        }
        out
    }

    /// A question from the bus; `None` for anything malformed.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let (&kind, rest) = bytes.split_first()?;
        let word = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(rest.get(at..at + 8)?.try_into().ok()?))
        };
        let asked = match kind {
            1 => Asked::Declare { ttl: word(72)? },
            2 => Asked::Hear,
            3 => Asked::Complete,
            _ => return None,
        };
        Some(Self {
            asked,
            pseudonym: Pseudonym(rest.get(..32)?.try_into().ok()?),
            presented: rest.get(32..64)?.try_into().ok()?,
            now: word(64)?,
        })
    }

    /// Answers the question from `declarations`, this node's table.
    pub fn answer_here(self, declarations: &Declarations) -> Answer {
        let (pseudonym, presented, now) = (self.pseudonym, &self.presented, self.now);
        match self.asked {
            Asked::Declare { ttl } => {
                Answer::Declared(declarations.declare(pseudonym, *presented, ttl, now))
            }
            Asked::Hear => Answer::Heard(declarations.hear(&pseudonym, presented, now)),
            Asked::Complete => Answer::Completed(declarations.complete(&pseudonym, presented, now)),
        }
    }
}

const HEARD: [Heard; 4] = [
    Heard::Accepted,
    Heard::Wrong,
    Heard::NoDeclaration,
    Heard::Spent,
];

impl Answer {
    /// The answer as the bus carries it: one byte for the outcome, then a wait (declared too
    /// often) or the attempts left (a wrong code).
    pub fn to_bytes(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9);
        match self {
            Self::Declared(Ok(())) => out.push(0),
            Self::Declared(Err(Refused::TooOften(wait))) => {
                out.push(1);
                out.extend_from_slice(&wait.to_be_bytes());
            }
            Self::Declared(Err(Refused::Full)) => out.push(2),
            Self::Heard(heard) => {
                out.push(
                    HEARD
                        .iter()
                        .position(|h| *h == heard)
                        .map_or(2, |i| i as u8),
                );
            }
            Self::Completed(completion) => match completion {
                Completion::Done => out.push(0),
                Completion::Waiting => out.push(1),
                Completion::Wrong { attempts_left } => {
                    out.push(2);
                    out.extend_from_slice(&attempts_left.to_be_bytes());
                }
                Completion::NoDeclaration => out.push(3),
                Completion::Expired => out.push(4),
                Completion::TooManyAttempts => out.push(5),
            },
        }
        out
    }

    /// The answer to `asked` from the bus; `None` for anything malformed.
    pub fn parse(asked: Asked, bytes: &[u8]) -> Option<Self> {
        let (&code, rest) = bytes.split_first()?;
        Some(match asked {
            Asked::Declare { .. } => Self::Declared(match code {
                0 => Ok(()),
                1 => Err(Refused::TooOften(u64::from_be_bytes(
                    rest.get(..8)?.try_into().ok()?,
                ))),
                2 => Err(Refused::Full),
                _ => return None,
            }),
            Asked::Hear => Self::Heard(*HEARD.get(usize::from(code))?),
            Asked::Complete => Self::Completed(match code {
                0 => Completion::Done,
                1 => Completion::Waiting,
                2 => Completion::Wrong {
                    attempts_left: u32::from_be_bytes(rest.get(..4)?.try_into().ok()?),
                },
                3 => Completion::NoDeclaration,
                4 => Completion::Expired,
                5 => Completion::TooManyAttempts,
                _ => return None,
            }),
        })
    }
}

/// Asks `question` of the number's declaration at its owner node (this node's table when it is
/// the owner, alone, or cut off from it).
pub async fn ask<S: tidings_store::Store>(
    state: &crate::state::Shared<S>,
    question: Question,
) -> Answer {
    if let Some(bus) = state.hub.bus() {
        if let Some(owner) = bus.declaration_owner(&question.pseudonym) {
            if let Some(answer) = bus
                .ask_owner(owner, crate::bus::Asking::Declaration, question.to_bytes())
                .await
                .and_then(|bytes| Answer::parse(question.asked, &bytes))
            {
                return answer;
            }
        }
    }
    question.answer_here(&state.declarations)
}

fn prune_entries(entries: &mut HashMap<Pseudonym, Entry>, now: Millis) {
    entries.retain(|_, entry| {
        if entry
            .declaration
            .as_ref()
            .is_some_and(|d| d.expires_at + EXPIRED_KEPT <= now)
        {
            entry.declaration = None;
        }
        DECLARATIONS_PER_NUMBER.prune(&mut entry.declared_at, now);
        entry.declaration.is_some() || !entry.declared_at.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_and_answers_cross_the_bus_unchanged() {
        let pseudonym = Pseudonym([4; 32]);
        for asked in [Asked::Declare { ttl: 45_000 }, Asked::Hear, Asked::Complete] {
            let question = Question {
                asked,
                pseudonym,
                presented: [9; 32],
                now: 1_234,
            };
            assert_eq!(Question::parse(&question.to_bytes()), Some(question));
        }
        assert_eq!(Question::parse(&[1, 2, 3]), None);
        let answers = [
            (Asked::Declare { ttl: 1 }, Answer::Declared(Ok(()))),
            (
                Asked::Declare { ttl: 1 },
                Answer::Declared(Err(Refused::TooOften(77))),
            ),
            (
                Asked::Declare { ttl: 1 },
                Answer::Declared(Err(Refused::Full)),
            ),
            (Asked::Hear, Answer::Heard(Heard::Accepted)),
            (Asked::Hear, Answer::Heard(Heard::Spent)),
            (Asked::Complete, Answer::Completed(Completion::Waiting)),
            (
                Asked::Complete,
                Answer::Completed(Completion::Wrong { attempts_left: 3 }),
            ),
            (
                Asked::Complete,
                Answer::Completed(Completion::TooManyAttempts),
            ),
        ];
        for (asked, answer) in answers {
            assert_eq!(Answer::parse(asked, &answer.to_bytes()), Some(answer));
        }
    }

    const NUMBER: Pseudonym = Pseudonym([1; 32]);
    const OTHER: Pseudonym = Pseudonym([2; 32]);
    const RIGHT: [u8; 32] = [7; 32];
    const WRONG: [u8; 32] = [8; 32];

    #[test]
    fn codes_are_found_in_what_people_text() {
        let code = new_code();
        assert_eq!(normalize(&code).as_deref(), Some(code.as_str()));
        assert_eq!(
            code_in_sms(&sms_text(&code)).as_deref(),
            Some(code.as_str())
        );
        let cases: &[(&str, Option<&str>)] = &[
            ("TIDINGS 7QK4-M2XD registers this number", Some("7QK4M2XD")),
            ("tidings 7qk4m2xd", Some("7QK4M2XD")),
            ("Tidings: 7QK4 M2XD", Some("7QK4M2XD")),
            // Letters that read like digits are those digits.
            ("TIDINGS OQKI-L2XD", Some("0QK112XD")),
            ("TIDINGS 7QK4-M2X", None),
            ("TIDINGS 7QK4-M2XU", None),
            ("7QK4-M2XD", None),
            ("", None),
            ("TIDINGS ✓✓✓✓-✓✓✓✓", None),
        ];
        for (text, expected) in cases {
            assert_eq!(code_in_sms(text).as_deref(), *expected, "{text}");
        }
    }

    #[test]
    fn an_sms_proves_only_its_own_number() {
        let table = Declarations::new(5);
        table.declare(NUMBER, RIGHT, MINUTE, 0).expect("declared");
        // The right code from another number finds nothing there.
        assert_eq!(table.hear(&OTHER, &RIGHT, 1), Heard::NoDeclaration);
        assert_eq!(table.complete(&NUMBER, &RIGHT, 2), Completion::Waiting);
        assert_eq!(table.hear(&NUMBER, &WRONG, 3), Heard::Wrong);
        assert_eq!(table.hear(&NUMBER, &RIGHT, 4), Heard::Accepted);
        assert_eq!(
            table.complete(&NUMBER, &WRONG, 5),
            Completion::Wrong { attempts_left: 3 }
        );
        assert_eq!(table.complete(&NUMBER, &RIGHT, 6), Completion::Done);
        assert_eq!(
            table.complete(&NUMBER, &RIGHT, 7),
            Completion::NoDeclaration
        );
    }

    #[test]
    fn attempts_expiry_and_declaration_limits() {
        let table = Declarations::new(2);
        table.declare(NUMBER, RIGHT, MINUTE, 0).expect("declared");
        assert_eq!(table.hear(&NUMBER, &WRONG, 1), Heard::Wrong);
        assert_eq!(
            table.complete(&NUMBER, &WRONG, 2),
            Completion::TooManyAttempts
        );
        assert_eq!(table.hear(&NUMBER, &RIGHT, 3), Heard::Spent);
        assert_eq!(
            table.complete(&NUMBER, &RIGHT, 4),
            Completion::TooManyAttempts
        );

        table
            .declare(NUMBER, RIGHT, MINUTE, 10)
            .expect("declared again");
        assert_eq!(table.hear(&NUMBER, &RIGHT, 10 + MINUTE), Heard::Spent);
        assert_eq!(
            table.complete(&NUMBER, &RIGHT, 10 + MINUTE),
            Completion::Expired
        );
        for at in 0..3 {
            table
                .declare(NUMBER, RIGHT, MINUTE, 20 + at)
                .expect("declared");
        }
        assert_eq!(
            table.declare(NUMBER, RIGHT, MINUTE, 30),
            Err(Refused::TooOften(HOUR - 30))
        );
        table.prune(HOUR + EXPIRED_KEPT + MINUTE);
        assert_eq!(
            table.complete(&NUMBER, &RIGHT, HOUR + EXPIRED_KEPT + MINUTE),
            Completion::NoDeclaration
        );
    }
}
