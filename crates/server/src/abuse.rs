//! The limits on registration that one client cannot multiply, and the budgets that stop SMS
//! pumping. Memory only, bounded, forgotten at restart; no number is kept in clear.
//!
//! - Who the client is: the peer address, or, when the peer is a configured trusted proxy, the
//!   rightmost `X-Forwarded-For` hop that is not one ([`client_address`]).
//! - Address limits count blocks, not addresses ([`AddressBlock::of_client`]): the narrow block
//!   (an IPv4 address, an IPv6 /64) at the per-address limit, the wide block (IPv4 /24, IPv6 /48)
//!   at a larger one.
//! - SMS budgets, taken only for a code that is about to be sent: one number's SMS per day, one
//!   number prefix's (the number without its last 3 digits: a sequential sweep) per hour, one
//!   country calling code's per hour, and all codes per hour. Premium-rate and shared-cost
//!   numbers are refused outright. Numbers and prefixes are keys only as a keyed hash (HMAC under
//!   a key derived from the key file's code key, the same on every node).
//! - With several nodes, every limit here is kept by one node of the deployment, the *abuse
//!   owner* (rendezvous hashing, as accounts' budgets: [`crate::bus::Bus::owner`]), which the
//!   others ask over the bus ([`ask`]), carrying only the client's address or the number's keyed
//!   hashes and country code: a client that spreads its requests over the nodes gets no more than
//!   from one. Alone, with the bus down or the owner silent, a node answers from its own tables.
//!
//! When a budget trips, a counter by budget name goes up and a log line names the budget — never
//! the number; at most one line per budget a minute, so that a flood of refused requests cannot
//! flood the log as well.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tidings_core::limits::{AddressBlock, TokenBucket, Window, WindowTable};
use tidings_core::{Millis, DAY, HOUR, MINUTE};
use tidings_proto::number::E164;

use crate::config::ServerConfig;
use crate::metrics::{Budget, Metrics};
use crate::state::Shared;

/// The period of the per-address registration limits.
pub const ADDRESS_WINDOW: Millis = 5 * MINUTE;
/// Trailing digits a number prefix leaves out: a prefix stands for 1,000 consecutive numbers.
pub const PREFIX_DIGITS_DROPPED: usize = 3;
/// Most country calling codes tracked; there are fewer than 300, and none has more than 3 digits.
const COUNTRY_CAPACITY: usize = 1_000;

/// Which limit refused a request: the metric label and the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tripped {
    /// The narrow address block (an IPv4 address, an IPv6 /64).
    Address,
    /// The wide address block (an IPv4 /24, an IPv6 /48).
    AddressBlock,
    /// Codes to one number per day.
    NumberDaily,
    /// Codes to one number prefix per hour.
    NumberPrefix,
    /// Codes to one country calling code per hour.
    Country,
    /// All codes per hour.
    Global,
    /// A premium-rate or shared-cost number.
    PremiumRate,
}

impl Tripped {
    const ALL: [Self; 7] = [
        Self::Address,
        Self::AddressBlock,
        Self::NumberDaily,
        Self::NumberPrefix,
        Self::Country,
        Self::Global,
        Self::PremiumRate,
    ];

    /// The byte an answer over the bus carries.
    fn to_byte(self) -> u8 {
        Self::ALL
            .iter()
            .position(|t| *t == self)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(u8::MAX)
    }

    fn from_byte(byte: u8) -> Option<Self> {
        Self::ALL.get(usize::from(byte)).copied()
    }

    /// The fixed word the metric and the log use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::AddressBlock => "address_block",
            Self::NumberDaily => "number_daily",
            Self::NumberPrefix => "number_prefix",
            Self::Country => "country",
            Self::Global => "global",
            Self::PremiumRate => "premium_rate",
        }
    }
}

/// A refusal: which limit, and how long until it would allow the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub tripped: Tripped,
    pub wait: Millis,
}

/// The two address limits a registration request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressLimit {
    /// Code requests.
    Codes,
    /// Verification and link attempts.
    Verifies,
}

/// The registration limiters.
#[derive(Debug)]
pub struct AbuseLimits {
    hash_key: [u8; 32],
    tables: Mutex<Tables>,
    /// When each budget's trip was last logged.
    logged: Mutex<HashMap<Tripped, Millis>>,
}

#[derive(Debug)]
struct Tables {
    codes_by_block: WindowTable<AddressBlock>,
    verifies_by_block: WindowTable<AddressBlock>,
    sms_by_number: WindowTable<[u8; 32]>,
    codes_by_prefix: WindowTable<[u8; 32]>,
    codes_by_country: HashMap<u16, TokenBucket>,
    codes: Option<TokenBucket>,
}

/// What [`AbuseLimits::take_sms`] took, to give back if the SMS is not sent after all:
/// the number only as keyed hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    number: [u8; 32],
    prefix: [u8; 32],
    country: u16,
    at: Millis,
}

impl Taken {
    const BYTES: usize = 32 + 32 + 2 + 8;

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.number);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&self.country.to_be_bytes());
        out.extend_from_slice(&self.at.to_be_bytes());
    }

    fn parse(bytes: &[u8]) -> Option<Self> {
        let bytes = bytes.get(..Self::BYTES)?;
        Some(Self {
            number: bytes[..32].try_into().ok()?,
            prefix: bytes[32..64].try_into().ok()?,
            country: u16::from_be_bytes(bytes[64..66].try_into().ok()?),
            at: u64::from_be_bytes(bytes[66..74].try_into().ok()?),
        })
    }
}

impl AbuseLimits {
    /// Empty limiters, each table holding at most `capacity` keys, hashing numbers under
    /// `hash_key` (the same on every node of a deployment: [`crate::keys::ServerKeys`]).
    pub fn new(capacity: usize, hash_key: [u8; 32]) -> Self {
        Self {
            hash_key,
            tables: Mutex::new(Tables {
                codes_by_block: WindowTable::new(capacity),
                verifies_by_block: WindowTable::new(capacity),
                sms_by_number: WindowTable::new(capacity),
                codes_by_prefix: WindowTable::new(capacity),
                codes_by_country: HashMap::new(),
                codes: None,
            }),
            logged: Mutex::default(),
        }
    }

    fn keyed_hash(&self, domain: &[u8], text: &str) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.hash_key)
            .unwrap_or_else(|_| unreachable!());
        mac.update(domain);
        mac.update(text.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Counts a request from `client` against both of its address blocks, or says which block is
    /// spent and for how long. A refused request is not counted.
    pub fn check_address(
        &self,
        config: &ServerConfig,
        limit: AddressLimit,
        client: IpAddr,
        now: Millis,
    ) -> Result<(), Refusal> {
        let (narrow_max, wide_max) = match limit {
            AddressLimit::Codes => (config.codes_per_address, config.codes_per_address_block),
            AddressLimit::Verifies => (
                config.verifies_per_address,
                config.verifies_per_address_block,
            ),
        };
        let window = |max| Window {
            max,
            period: ADDRESS_WINDOW,
        };
        let [narrow, wide] = AddressBlock::of_client(client);
        let Ok(mut tables) = self.tables.lock() else {
            return Err(Refusal {
                tripped: Tripped::Address,
                wait: MINUTE,
            });
        };
        let table = match limit {
            AddressLimit::Codes => &mut tables.codes_by_block,
            AddressLimit::Verifies => &mut tables.verifies_by_block,
        };
        for (block, max, tripped) in [
            (narrow, narrow_max, Tripped::Address),
            (wide, wide_max, Tripped::AddressBlock),
        ] {
            table
                .check(&block, window(max), now)
                .map_err(|wait| Refusal { tripped, wait })?;
        }
        table.record(narrow, window(narrow_max), now);
        table.record(wide, window(wide_max), now);
        Ok(())
    }

    /// What a code to `number` at `now` takes from the SMS budgets: its keys in them.
    pub fn sms_keys(&self, number: &E164, now: Millis) -> Taken {
        let text = number.as_str();
        Taken {
            number: self.keyed_hash(b"number", text),
            prefix: self.keyed_hash(
                b"prefix",
                &text[..text.len().saturating_sub(PREFIX_DIGITS_DROPPED)],
            ),
            country: country_code(number),
            at: now,
        }
    }

    /// Takes one SMS from every budget the number with these keys counts against, or takes
    /// nothing and says which budget is spent and for how long.
    fn take_sms(&self, config: &ServerConfig, taken: Taken) -> Result<(), Refusal> {
        let now = taken.at;
        let daily = Window {
            max: config.sms_per_number_per_day,
            period: DAY,
        };
        let hourly = Window {
            max: config.codes_per_prefix_per_hour,
            period: HOUR,
        };
        let Ok(mut tables) = self.tables.lock() else {
            return Err(Refusal {
                tripped: Tripped::Global,
                wait: MINUTE,
            });
        };
        let tables = &mut *tables;
        let refuse = |tripped| move |wait| Refusal { tripped, wait };
        tables
            .sms_by_number
            .check(&taken.number, daily, now)
            .map_err(refuse(Tripped::NumberDaily))?;
        tables
            .codes_by_prefix
            .check(&taken.prefix, hourly, now)
            .map_err(refuse(Tripped::NumberPrefix))?;
        if tables.codes_by_country.len() >= COUNTRY_CAPACITY
            && !tables.codes_by_country.contains_key(&taken.country)
        {
            tables
                .codes_by_country
                .retain(|_, bucket| !bucket.is_full(now));
        }
        let per_hour = |count: usize| {
            let count = u32::try_from(count).unwrap_or(u32::MAX);
            TokenBucket::new(count, f64::from(count) / 3600.0, now)
        };
        let country = tables
            .codes_by_country
            .entry(taken.country)
            .or_insert_with(|| per_hour(config.codes_per_country_per_hour));
        country.try_take(1, now).map_err(refuse(Tripped::Country))?;
        let global = tables
            .codes
            .get_or_insert_with(|| per_hour(config.codes_per_hour));
        if let Err(wait) = global.try_take(1, now) {
            if let Some(country) = tables.codes_by_country.get_mut(&taken.country) {
                country.give_back(1);
            }
            return Err(refuse(Tripped::Global)(wait));
        }
        tables.sms_by_number.record(taken.number, daily, now);
        tables.codes_by_prefix.record(taken.prefix, hourly, now);
        Ok(())
    }

    /// Gives back what [`take_sms`](Self::take_sms) took, for an SMS the gateway
    /// did not send.
    pub fn give_back(&self, taken: Taken) {
        let Ok(mut tables) = self.tables.lock() else {
            return;
        };
        tables.sms_by_number.forget(&taken.number, taken.at);
        tables.codes_by_prefix.forget(&taken.prefix, taken.at);
        if let Some(country) = tables.codes_by_country.get_mut(&taken.country) {
            country.give_back(1);
        }
        if let Some(global) = tables.codes.as_mut() {
            global.give_back(1);
        }
    }

    /// Counts a refusal in the metric and says in the log which budget tripped (never the
    /// number), at most once a minute per budget.
    pub fn report(&self, metrics: &Metrics, refusal: Refusal, now: Millis) {
        let label = refusal.tripped.label();
        metrics
            .code_budget_trips
            .get_or_create(&Budget { budget: label })
            .inc();
        let due = self.logged.lock().is_ok_and(|mut logged| {
            let last = logged.entry(refusal.tripped).or_insert(0);
            let due = *last == 0 || now.saturating_sub(*last) >= MINUTE;
            if due {
                *last = now.max(1);
            }
            due
        });
        if due {
            tracing::warn!(
                budget = label,
                retry_after_seconds = refusal.wait.div_ceil(1000),
                "code budget tripped: a code request was refused before any SMS was sent (logged at most once a minute per budget; the code_budget_trips metric counts each)"
            );
        }
    }

    /// Forgets entries that no longer restrict anyone, so memory follows activity.
    pub fn prune(&self, now: Millis) {
        if let Ok(mut tables) = self.tables.lock() {
            tables.codes_by_block.prune(ADDRESS_WINDOW, now);
            tables.verifies_by_block.prune(ADDRESS_WINDOW, now);
            tables.sms_by_number.prune(DAY, now);
            tables.codes_by_prefix.prune(HOUR, now);
            tables
                .codes_by_country
                .retain(|_, bucket| !bucket.is_full(now));
        }
    }
}

/// What a node asks of the abuse owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// Count a request from `client` against its address blocks ([`AbuseLimits::check_address`]).
    Address { limit: AddressLimit, client: IpAddr },
    /// Take one SMS from every budget of the number with these keys.
    Sms(Taken),
    /// Give back what an SMS that was not sent took.
    GiveBack(Taken),
}

impl Question {
    /// The question as the bus carries it.
    pub fn to_bytes(self, now: Millis) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 8 + 17 + Taken::BYTES);
        match self {
            Self::Address { limit, client } => {
                out.push(match limit {
                    AddressLimit::Codes => 1,
                    AddressLimit::Verifies => 2,
                });
                out.extend_from_slice(&now.to_be_bytes());
                let v6 = match client {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                out.extend_from_slice(&v6.octets());
            }
            Self::Sms(taken) | Self::GiveBack(taken) => {
                out.push(if matches!(self, Self::Sms(_)) { 3 } else { 4 });
                out.extend_from_slice(&now.to_be_bytes());
                taken.put(&mut out);
            }
        }
        out
    }

    /// A question and its time from the bus; `None` for anything malformed.
    pub fn parse(bytes: &[u8]) -> Option<(Self, Millis)> {
        let (&kind, rest) = bytes.split_first()?;
        let now = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let rest = &rest[8..];
        let question = match kind {
            1 | 2 => {
                let octets: [u8; 16] = rest.get(..16)?.try_into().ok()?;
                let v6 = std::net::Ipv6Addr::from(octets);
                let client = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
                let limit = if kind == 1 {
                    AddressLimit::Codes
                } else {
                    AddressLimit::Verifies
                };
                Self::Address { limit, client }
            }
            3 => Self::Sms(Taken::parse(rest)?),
            4 => Self::GiveBack(Taken::parse(rest)?),
            _ => return None,
        };
        Some((question, now))
    }
}

/// An answer as the bus carries it: `[0]`, or `[1]`, the limit and the wait.
pub fn answer_to_bytes(answer: Result<(), Refusal>) -> Vec<u8> {
    match answer {
        Ok(()) => vec![0],
        Err(refusal) => {
            let mut out = vec![1, refusal.tripped.to_byte()];
            out.extend_from_slice(&refusal.wait.to_be_bytes());
            out
        }
    }
}

/// An answer from the bus; `None` for anything malformed.
pub fn answer_from_bytes(bytes: &[u8]) -> Option<Result<(), Refusal>> {
    match bytes.split_first()? {
        (0, _) => Some(Ok(())),
        (1, rest) => Some(Err(Refusal {
            tripped: Tripped::from_byte(*rest.first()?)?,
            wait: u64::from_be_bytes(rest.get(1..9)?.try_into().ok()?),
        })),
        _ => None,
    }
}

/// Answers `question` from this node's tables.
pub fn answer_here(
    limits: &AbuseLimits,
    config: &ServerConfig,
    question: Question,
    now: Millis,
) -> Result<(), Refusal> {
    match question {
        Question::Address { limit, client } => limits.check_address(config, limit, client, now),
        Question::Sms(taken) => limits.take_sms(config, taken),
        Question::GiveBack(taken) => {
            limits.give_back(taken);
            Ok(())
        }
    }
}

/// Answers `question` at the abuse owner (this node if it is the owner, alone, or cut off from
/// it: see the module documentation).
pub async fn ask<S: tidings_store::Store>(
    state: &Shared<S>,
    question: Question,
    now: Millis,
) -> Result<(), Refusal> {
    if let Some(bus) = state.hub.bus() {
        if let Some(owner) = bus.abuse_owner() {
            if let Some(answer) = bus
                .ask_owner(owner, crate::bus::Asking::Abuse, question.to_bytes(now))
                .await
                .and_then(|bytes| answer_from_bytes(&bytes))
            {
                return answer;
            }
        }
    }
    answer_here(&state.abuse, &state.config, question, now)
}

/// The number's country calling code (such as 49 for Germany).
fn country_code(number: &E164) -> u16 {
    phonenumber::parse(None, number.as_str()).map_or(0, |parsed| parsed.code().value())
}

/// True for the numbers no code is ever sent to: premium-rate and shared-cost lines, which earn
/// whoever holds them money for every SMS.
pub fn is_premium_rate(number: &E164) -> bool {
    phonenumber::parse(None, number.as_str()).is_ok_and(|parsed| {
        matches!(
            parsed.number_type(&phonenumber::metadata::DATABASE),
            phonenumber::Type::PremiumRate | phonenumber::Type::SharedCost
        )
    })
}

/// The client a request comes from: the peer, unless the peer is a trusted proxy; then the
/// rightmost `X-Forwarded-For` hop that is not a trusted proxy (the hops to its right were
/// written by proxies we trust; those to its left by the client, who can write anything). A hop
/// that is not an address ends the walk at the last trusted one.
pub fn client_address(
    trusted_proxies: &[AddressBlock],
    peer: IpAddr,
    headers: &HeaderMap,
) -> IpAddr {
    let trusted = |ip: IpAddr| trusted_proxies.iter().any(|block| block.contains(ip));
    if !trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = parse_hop(hop) else {
            return client;
        };
        client = ip;
        if !trusted(ip) {
            return ip;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop_behind_a_trusted_proxy() {
        let proxies = [
            AddressBlock::parse("10.0.0.0/8").expect("block"),
            AddressBlock::parse("::1").expect("block"),
        ];
        let check = |peer: &str, chain: &[&str], expected: &str| {
            let mut headers = HeaderMap::new();
            for value in chain {
                headers.append("x-forwarded-for", value.parse().expect("header"));
            }
            let peer: IpAddr = peer.parse().expect("peer");
            assert_eq!(
                client_address(&proxies, peer, &headers),
                expected.parse::<IpAddr>().expect("expected"),
                "{peer} {chain:?}"
            );
        };
        check("192.0.2.9", &["198.51.100.1"], "192.0.2.9");
        check("10.0.0.1", &[], "10.0.0.1");
        check("10.0.0.1", &["198.51.100.1"], "198.51.100.1");
        check(
            "10.0.0.1",
            &["6.6.6.6, 198.51.100.1, 10.0.0.2"],
            "198.51.100.1",
        );
        check(
            "10.0.0.1",
            &["6.6.6.6", "198.51.100.1:4431"],
            "198.51.100.1",
        );
        check("::1", &["[2001:db8::5]:443"], "2001:db8::5");
        check("10.0.0.1", &["10.0.0.3, 10.0.0.2"], "10.0.0.3");
        check("10.0.0.1", &["198.51.100.1, garbage"], "10.0.0.1");
        check("10.0.0.1", &["garbage, 10.0.0.2"], "10.0.0.2");
    }

    /// Settings over the defaults, from an empty config file.
    fn config(settings: impl FnOnce(&mut crate::config::ServerArgs)) -> ServerConfig {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file =
            std::env::temp_dir().join(format!("tidings-abuse-{}-{n}.toml", std::process::id()));
        std::fs::write(&file, "").expect("config file");
        let mut args = crate::config::ServerArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        settings(&mut args);
        let config = args.resolve().expect("settings");
        let _ = std::fs::remove_file(&file);
        config
    }

    fn tripped<T>(result: Result<T, Refusal>) -> Option<Tripped> {
        result.err().map(|refusal| refusal.tripped)
    }

    #[test]
    fn sms_budgets_take_all_or_nothing_and_give_back() {
        let config = config(|args| {
            args.sms_per_number_per_day = Some(2);
            args.codes_per_prefix_per_hour = Some(2);
            args.codes_per_country_per_hour = Some(3);
        });
        let limits = AbuseLimits::new(100, [3; 32]);
        let take = |number: &str, now| {
            let number = E164::parse(number).expect("a valid number");
            let taken = limits.sms_keys(&number, now);
            limits.take_sms(&config, taken).map(|()| taken)
        };
        assert_eq!(tripped(take("+4915112345001", 0)), None);
        assert_eq!(tripped(take("+4915112345001", 0)), None);
        assert_eq!(
            tripped(take("+4915112345001", 0)),
            Some(Tripped::NumberDaily)
        );
        assert_eq!(
            tripped(take("+4915112345002", 0)),
            Some(Tripped::NumberPrefix)
        );
        let taken = take("+4915112346001", 0).expect("the country's last code this hour");
        assert_eq!(tripped(take("+4915112347001", 0)), Some(Tripped::Country));
        assert_eq!(tripped(take("+12015550123", 0)), None, "another country");
        // What was given back (the gateway failed) can be taken again.
        limits.give_back(taken);
        assert_eq!(tripped(take("+4915112346001", 0)), None);
        // The hourly budgets come back within the hour; the number's cap only after a day.
        assert_eq!(tripped(take("+4915112345002", HOUR + 1)), None);
        let refusal = take("+4915112345001", HOUR + 1).expect_err("the daily cap");
        assert_eq!(refusal.tripped, Tripped::NumberDaily);
        assert_eq!(refusal.wait, DAY - HOUR - 1);
    }

    #[test]
    fn address_limits_count_the_narrow_and_the_wide_block() {
        let config = config(|args| {
            args.codes_per_address = Some(2);
            args.codes_per_address_block = Some(3);
        });
        let limits = AbuseLimits::new(100, [3; 32]);
        let check = |ip: &str| {
            let ip = ip.parse().expect("an address");
            tripped(limits.check_address(&config, AddressLimit::Codes, ip, 0))
        };
        assert_eq!(check("2001:db8:1:1::1"), None);
        assert_eq!(check("2001:db8:1:1::2"), None);
        assert_eq!(check("2001:db8:1:1:ffff::3"), Some(Tripped::Address));
        assert_eq!(check("2001:db8:1:2::1"), None, "another /64");
        assert_eq!(check("2001:db8:1:3::1"), Some(Tripped::AddressBlock));
        assert_eq!(check("2001:db8:2::1"), None, "another /48");
        assert_eq!(
            tripped(limits.check_address(
                &config,
                AddressLimit::Verifies,
                "2001:db8:1:1::1".parse().expect("an address"),
                0
            )),
            None,
            "verification attempts are counted apart"
        );
    }

    #[test]
    fn questions_and_answers_cross_the_bus_unchanged() {
        let limits = AbuseLimits::new(100, [3; 32]);
        let number = E164::parse("+4915112345001").expect("a valid number");
        let taken = limits.sms_keys(&number, 77);
        for question in [
            Question::Address {
                limit: AddressLimit::Codes,
                client: "192.0.2.7".parse().expect("an address"),
            },
            Question::Address {
                limit: AddressLimit::Verifies,
                client: "2001:db8::1".parse().expect("an address"),
            },
            Question::Sms(taken),
            Question::GiveBack(taken),
        ] {
            assert_eq!(
                Question::parse(&question.to_bytes(99)),
                Some((question, 99))
            );
        }
        assert_eq!(Question::parse(&[3, 0, 0]), None);
        for answer in [
            Ok(()),
            Err(Refusal {
                tripped: Tripped::Global,
                wait: 1234,
            }),
        ] {
            assert_eq!(answer_from_bytes(&answer_to_bytes(answer)), Some(answer));
        }
        // Every node hashes a number alike (the key comes from the key file), so its budgets
        // meet at the owner.
        assert_eq!(AbuseLimits::new(5, [3; 32]).sms_keys(&number, 77), taken);
    }

    #[test]
    fn premium_rate_and_shared_cost_numbers_are_recognised() {
        let check = |text: &str, expected: bool| {
            let number = E164::parse(text).expect("a valid number");
            assert_eq!(is_premium_rate(&number), expected, "{text}");
            assert!(country_code(&number) > 0, "{text}");
        };
        check("+499001234567", true);
        check("+449012345678", true);
        check("+4915112345678", false);
        check("+12015550123", false);
    }
}
