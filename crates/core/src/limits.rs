//! Rate limits. A [`TokenBucket`] bounds a steady rate with bursts; a [`Window`] bounds how many
//! events fall inside a sliding period (verification codes: "2 per 8 hours"); a [`WindowTable`]
//! keeps one window's history per key (address block, number, prefix) in bounded memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Millis;

/// A block of client addresses that limits count together: what one client can cheaply hold.
/// An IPv4 address alone or its /24; an IPv6 /64 (one customer's LAN) or its /48 (one site).
/// An IPv4-mapped IPv6 address is its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressBlock {
    /// The block's first address (the address with its host bits cleared).
    pub base: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl AddressBlock {
    /// The block of `prefix` bits that holds `ip` (the prefix is capped at the address's width).
    pub fn of(ip: IpAddr, prefix: u8) -> Self {
        match canonical(ip) {
            IpAddr::V4(v4) => {
                let prefix = prefix.min(32);
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                Self {
                    base: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    prefix,
                }
            }
            IpAddr::V6(v6) => {
                let prefix = prefix.min(128);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                Self {
                    base: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    prefix,
                }
            }
        }
    }

    /// The blocks `ip` counts against, narrowest first: for IPv4 the address and its /24, for
    /// IPv6 its /64 and its /48. A limit keyed on the narrow block alone is multiplied by every
    /// address a client holds (an IPv6 /64 is 2^64 of them); the wide block bounds that.
    pub fn of_client(ip: IpAddr) -> [Self; 2] {
        match canonical(ip) {
            ip @ IpAddr::V4(_) => [Self::of(ip, 32), Self::of(ip, 24)],
            ip @ IpAddr::V6(_) => [Self::of(ip, 64), Self::of(ip, 48)],
        }
    }
}

impl AddressBlock {
    /// Parses `address` or `address/prefix` (such as `10.0.0.0/8` or `2001:db8::/32`); the host
    /// bits of the address are cleared. `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
            None => (text.trim(), None),
        };
        let ip: IpAddr = address.parse().ok()?;
        let width = if canonical(ip).is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(width);
        (prefix <= width).then(|| Self::of(ip, prefix))
    }

    /// True when `ip` lies inside this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Self::of(ip, self.prefix) == *self
    }
}

impl std::fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; any other address as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A token bucket: `capacity` tokens, refilled continuously at `per_hour` tokens an hour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_ms: f64,
    tokens: f64,
    updated: Millis,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, refill_per_second: f64, now: Millis) -> Self {
        Self {
            capacity: f64::from(capacity),
            refill_per_ms: refill_per_second / 1000.0,
            tokens: f64::from(capacity),
            updated: now,
        }
    }

    fn refill(&mut self, now: Millis) {
        let elapsed = now.saturating_sub(self.updated) as f64;
        self.tokens = (self.tokens + elapsed * self.refill_per_ms).min(self.capacity);
        self.updated = self.updated.max(now);
    }

    /// Takes `n` tokens if there are that many; otherwise takes none and says how long until
    /// there will be (in milliseconds; `Millis::MAX` if `n` exceeds the capacity).
    pub fn try_take(&mut self, n: u32, now: Millis) -> Result<(), Millis> {
        self.refill(now);
        let n = f64::from(n);
        if n <= self.tokens {
            self.tokens -= n;
            return Ok(());
        }
        if n > self.capacity || self.refill_per_ms <= 0.0 {
            return Err(Millis::MAX);
        }
        Err(((n - self.tokens) / self.refill_per_ms).ceil() as Millis)
    }

    /// Takes up to `max` whole tokens, as many as there are; how many it took.
    pub fn take_up_to(&mut self, max: u32, now: Millis) -> u32 {
        self.refill(now);
        let taken = self.tokens.floor().clamp(0.0, f64::from(max));
        self.tokens -= taken;
        taken as u32
    }

    /// Returns `n` tokens taken for something that did not happen after all (up to the capacity).
    pub fn give_back(&mut self, n: u32) {
        self.tokens = (self.tokens + f64::from(n)).min(self.capacity);
    }

    /// True when the bucket is full again, so its entry can be forgotten.
    pub fn is_full(&self, now: Millis) -> bool {
        let mut copy = *self;
        copy.refill(now);
        copy.tokens >= copy.capacity
    }
}

/// A sliding window: at most `max` events within any `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Events allowed per period.
    pub max: usize,
    /// The period, in milliseconds.
    pub period: Millis,
}

impl Window {
    /// Given the times of earlier events, whether one more may happen now; if not, how long until
    /// the oldest event inside the window leaves it. A window of `max` 0 allows nothing and
    /// answers a whole period.
    pub fn check(&self, earlier: &[Millis], now: Millis) -> Result<(), Millis> {
        if self.max == 0 {
            return Err(self.period);
        }
        let mut inside: Vec<Millis> = earlier
            .iter()
            .copied()
            .filter(|t| t.saturating_add(self.period) > now)
            .collect();
        if inside.len() < self.max {
            return Ok(());
        }
        inside.sort_unstable();
        let oldest_that_must_leave = inside[inside.len() - self.max];
        Err(oldest_that_must_leave
            .saturating_add(self.period)
            .saturating_sub(now))
    }

    /// Drops the events that no longer count, so stored history stays bounded.
    pub fn prune(&self, earlier: &mut Vec<Millis>, now: Millis) {
        earlier.retain(|t| t.saturating_add(self.period) > now);
    }
}

/// The event times of one sliding window per key, for at most `capacity` keys. When the table is
/// full, a new key first drops the keys whose events have all left the window, then, if none did,
/// the eighth of the keys whose latest event is oldest: memory stays bounded and a flood of new
/// keys can never lock everyone out; at worst it makes the table forget some old clients early.
#[derive(Debug, Clone)]
pub struct WindowTable<K> {
    events: HashMap<K, Vec<Millis>>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> WindowTable<K> {
    /// An empty table for at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            events: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Whether one more event for `key` fits `window` now; if not, how long until it will.
    pub fn check(&self, key: &K, window: Window, now: Millis) -> Result<(), Millis> {
        window.check(self.events.get(key).map_or(&[][..], Vec::as_slice), now)
    }

    /// Records an event for `key` now (after [`check`](Self::check) allowed it).
    pub fn record(&mut self, key: K, window: Window, now: Millis) {
        if !self.events.contains_key(&key) && self.events.len() >= self.capacity {
            self.prune(window.period, now);
            if self.events.len() >= self.capacity {
                self.evict_oldest();
            }
        }
        let times = self.events.entry(key).or_default();
        window.prune(times, now);
        times.push(now);
    }

    /// Forgets one event of `key` recorded at `at`, for something that did not happen after all.
    pub fn forget(&mut self, key: &K, at: Millis) {
        if let Some(times) = self.events.get_mut(key) {
            if let Some(index) = times.iter().position(|t| *t == at) {
                times.swap_remove(index);
            }
            if times.is_empty() {
                self.events.remove(key);
            }
        }
    }

    /// Drops the keys with no event inside the last `period`.
    pub fn prune(&mut self, period: Millis, now: Millis) {
        self.events
            .retain(|_, times| times.iter().any(|t| t.saturating_add(period) > now));
    }

    /// Drops the eighth of the keys (at least one) whose latest event is oldest.
    fn evict_oldest(&mut self) {
        let newest = |times: &Vec<Millis>| times.iter().copied().max().unwrap_or(0);
        let mut latest: Vec<Millis> = self.events.values().map(newest).collect();
        if latest.is_empty() {
            return;
        }
        let count = (latest.len() / 8).max(1);
        let (_, &mut cutoff, _) = latest.select_nth_unstable(count - 1);
        let mut left = count;
        self.events.retain(|_, times| {
            if left > 0 && newest(times) <= cutoff {
                left -= 1;
                return false;
            }
            true
        });
    }

    /// How many keys the table holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when the table holds no key.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HOUR, MINUTE, SECOND};

    #[test]
    fn taking_up_to_takes_what_there_is_and_no_more() {
        let mut bucket = TokenBucket::new(10, 1.0, 0);
        bucket.try_take(7, 0).expect("seven of ten");
        assert_eq!(bucket.take_up_to(5, 0), 3);
        assert_eq!(bucket.take_up_to(5, 0), 0);
        assert_eq!(bucket.try_take(1, 0), Err(1000));
        assert_eq!(bucket.take_up_to(5, 2_500), 2, "whole tokens only");
    }

    #[test]
    fn address_blocks_group_what_one_client_holds() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("a literal address");
        let [one, wide] = AddressBlock::of_client(ip("192.0.2.77"));
        assert_eq!(one.to_string(), "192.0.2.77/32");
        assert_eq!(wide.to_string(), "192.0.2.0/24");
        assert_eq!(
            AddressBlock::of_client(ip("::ffff:192.0.2.77")),
            [one, wide],
            "a mapped IPv4 address is the IPv4 address"
        );
        let [lan, site] = AddressBlock::of_client(ip("2001:db8:1:2:aaaa::1"));
        assert_eq!(lan.to_string(), "2001:db8:1:2::/64");
        assert_eq!(site.to_string(), "2001:db8:1::/48");
        assert_eq!(
            AddressBlock::of_client(ip("2001:db8:1:2:ffff::9"))[0],
            lan,
            "every address of a /64 is one client"
        );
        assert_ne!(AddressBlock::of_client(ip("2001:db8:1:3::1"))[0], lan);
        assert_eq!(AddressBlock::of_client(ip("2001:db8:1:3::1"))[1], site);
        assert_eq!(AddressBlock::of(ip("10.1.2.3"), 0).to_string(), "0.0.0.0/0");
        assert_eq!(AddressBlock::of(ip("10.1.2.3"), 99).prefix, 32);
    }

    #[test]
    fn blocks_parse_and_contain() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        let check = |text: &str, expected: Option<&str>| {
            assert_eq!(
                AddressBlock::parse(text).map(|b| b.to_string()),
                expected.map(str::to_string),
                "{text}"
            );
        };
        check("10.1.2.3", Some("10.1.2.3/32"));
        check("10.1.2.3/8", Some("10.0.0.0/8"));
        check(" 2001:db8::1/32 ", Some("2001:db8::/32"));
        check("::1", Some("::1/128"));
        check("10.1.2.3/33", None);
        check("10.1.2.3/x", None);
        check("proxy.example", None);
        let proxies = AddressBlock::parse("10.0.0.0/8").expect("a block");
        assert!(proxies.contains(ip("10.200.0.1")));
        assert!(proxies.contains(ip("::ffff:10.0.0.1")));
        assert!(!proxies.contains(ip("11.0.0.1")));
        assert!(!proxies.contains(ip("2001:db8::1")));
    }

    #[test]
    fn a_full_table_forgets_the_oldest_keys() {
        let window = Window {
            max: 2,
            period: HOUR,
        };
        let mut table = WindowTable::new(4);
        for key in 0..4u32 {
            table.record(key, window, Millis::from(key) * SECOND);
        }
        // Full and every key still inside its window: the oldest key is forgotten.
        table.record(9, window, 10 * SECOND);
        assert_eq!(table.len(), 4);
        assert_eq!(table.check(&0, window, 10 * SECOND), Ok(()));
        table.record(9, window, 11 * SECOND);
        assert_eq!(
            table.check(&9, window, 12 * SECOND),
            Err(HOUR - 2 * SECOND),
            "the newest key is still limited"
        );
        // Keys whose events have left the window go first.
        table.record(10, window, 2 * HOUR);
        assert_eq!(table.len(), 1);
        table.forget(&10, 2 * HOUR);
        assert!(
            table.is_empty(),
            "forgetting its only event forgets the key"
        );
        table.record(11, window, 3 * HOUR);
        table.prune(HOUR, 4 * HOUR);
        assert!(table.is_empty());
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let mut bucket = TokenBucket::new(3, 1.0, 0);
        for _ in 0..3 {
            assert_eq!(bucket.try_take(1, 0), Ok(()));
        }
        assert_eq!(bucket.try_take(1, 0), Err(SECOND));
        assert_eq!(bucket.try_take(1, SECOND / 2), Err(SECOND / 2));
        assert_eq!(bucket.try_take(1, SECOND), Ok(()));
        assert_eq!(bucket.try_take(4, 100 * SECOND), Err(Millis::MAX));
        bucket.give_back(5);
        assert_eq!(bucket.try_take(3, 100 * SECOND), Ok(()));
        bucket.give_back(1);
        assert_eq!(bucket.try_take(1, 100 * SECOND), Ok(()));
        assert!(bucket.try_take(1, 100 * SECOND).is_err());
        assert!(!bucket.is_full(100 * SECOND), "emptied");
        assert!(bucket.is_full(103 * SECOND), "refilled at 1 a second");
    }

    #[test]
    fn window_counts_only_recent_events() {
        let two_per_8h = Window {
            max: 2,
            period: 8 * HOUR,
        };
        let check = |earlier: &[Millis], now, expected| {
            assert_eq!(
                two_per_8h.check(earlier, now),
                expected,
                "{earlier:?} at {now}"
            );
        };
        check(&[], 0, Ok(()));
        check(&[0], MINUTE, Ok(()));
        check(&[0, MINUTE], 2 * MINUTE, Err(8 * HOUR - 2 * MINUTE));
        check(&[0, MINUTE], 8 * HOUR, Ok(()));
        // A window that allows nothing refuses every event, with or without history.
        let none = Window {
            max: 0,
            period: 8 * HOUR,
        };
        assert!(none.check(&[], 0).is_err());
        assert!(none.check(&[0], MINUTE).is_err());
        let mut history = vec![0, MINUTE, 9 * HOUR];
        two_per_8h.prune(&mut history, 9 * HOUR);
        assert_eq!(history, vec![9 * HOUR]);
    }
}
