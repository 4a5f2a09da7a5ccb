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
//!   a random key of this process).
//!
//! When a budget trips, a counter by budget name goes up and a log line names the budget — never
//! the number; at most one line per budget a minute, so that a flood of refused requests cannot
//! flood the log as well.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use sha2::Sha256;
use tidings_core::limits::{AddressBlock, TokenBucket, Window, WindowTable};
use tidings_core::{Millis, DAY, HOUR, MINUTE};
use tidings_proto::number::E164;

use crate::config::ServerConfig;
use crate::metrics::{Budget, Metrics};

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

/// What [`AbuseLimits::take_sms_budgets`] took, to give back if the SMS is not sent after all.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    number: [u8; 32],
    prefix: [u8; 32],
    country: u16,
    at: Millis,
}

impl AbuseLimits {
    /// Empty limiters, each table holding at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        let mut hash_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut hash_key);
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

    /// Takes one SMS from every budget the number counts against, or takes nothing and says
    /// which budget is spent and for how long.
    pub fn take_sms_budgets(
        &self,
        config: &ServerConfig,
        number: &E164,
        now: Millis,
    ) -> Result<Taken, Refusal> {
        let text = number.as_str();
        let taken = Taken {
            number: self.keyed_hash(b"number", text),
            prefix: self.keyed_hash(
                b"prefix",
                &text[..text.len().saturating_sub(PREFIX_DIGITS_DROPPED)],
            ),
            country: country_code(number),
            at: now,
        };
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
        Ok(taken)
    }

    /// Gives back what [`take_sms_budgets`](Self::take_sms_budgets) took, for an SMS the gateway
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
        let limits = AbuseLimits::new(100);
        let take = |number: &str, now| {
            let number = E164::parse(number).expect("a valid number");
            limits.take_sms_budgets(&config, &number, now)
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
        let limits = AbuseLimits::new(100);
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
