//! Registration limits that one client cannot multiply (issue 28, item 7): address blocks rather
//! than single addresses, a trusted proxy's `X-Forwarded-For`, limiter tables that forget the
//! oldest entry instead of refusing new ones, budgets against SMS pumping (sequential sweeps,
//! premium-rate numbers) and a daily cap on the SMS one number receives.
//!
//! Requests are raw HTTP from chosen loopback source addresses (all of 127.0.0.0/8 reaches the
//! server), since the CLI cannot pretend to be several clients.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{block_on, number, Server};

/// One HTTP answer: status, JSON body and the `Retry-After` header, if any.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    body: serde_json::Value,
    retry_after_header: Option<u64>,
}

/// Asks for a code for `number` from the loopback address `from`, optionally with an
/// `X-Forwarded-For` header.
pub fn request_code(
    server: &Server,
    from: [u8; 4],
    forwarded_for: Option<&str>,
    number: &str,
) -> Answer {
    let port = server.port;
    block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(IpAddr::from(from), 0))
            .expect("bind a loopback source address");
        let mut stream = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("connect");
        let body = json!({ "number": number }).to_string();
        let forwarded = forwarded_for
            .map(|chain| format!("X-Forwarded-For: {chain}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST /v1/registration/code HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\n{forwarded}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response))
            .await
            .expect("an answer")
            .expect("read");
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let retry_after_header = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("retry-after")
                .then(|| value.trim().parse().ok())
                .flatten()
        });
        Answer {
            status,
            body: serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
            retry_after_header,
        }
    })
}

/// A refusal says when to try again, in the header and in the body alike.
fn assert_refused_with_retry_time(answer: &Answer, context: &str) {
    assert_eq!(answer.status, 429, "{context}: {answer:?}");
    assert_eq!(
        answer.body["error"], "rate_limited",
        "{context}: {answer:?}"
    );
    let seconds = answer.body["retry_after"].as_u64();
    assert!(
        seconds.is_some_and(|s| s > 0),
        "{context}: no retry time in the body: {answer:?}"
    );
    assert_eq!(
        answer.retry_after_header, seconds,
        "{context}: Retry-After differs from the body"
    );
}

/// How many SMS the `outbox` gateway wrote to `number` (all numbers when `None`).
fn sms_sent(server: &Server, number: Option<&str>) -> usize {
    let Ok(entries) = std::fs::read_dir(server.outbox()) else {
        return 0;
    };
    entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            if name.starts_with('.') {
                return None;
            }
            let sms: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            number.is_none_or(|n| sms["to"] == n).then_some(())
        })
        .count()
}

/// Numbers that differ in their thousands, so that no two share a number-prefix budget.
fn spread_number(i: u32) -> String {
    format!(
        "+49151{:08}",
        30_000_000 + (std::process::id() % 100) * 100_000 + i * 1000
    )
}

/// Tried from outside: 40 codes to 40 sequential numbers, 5 from each of 8 addresses of one /24,
/// all went out. The /24 is one client, and a sweep of one number prefix is SMS pumping: most
/// are refused, with a retry time, before any SMS is sent; the metric says which budget tripped
/// and the log says so without the number.
#[test]
fn a_sweep_of_sequential_numbers_from_one_block_is_mostly_refused() {
    let server = Server::start(&[]);
    let mut sent = 0;
    let mut refused = 0;
    for i in 0..40u32 {
        let from = [127, 0, 0, 2 + u8::try_from(i % 8).expect("small")];
        let number = format!("+49151{:08}", 20_000_000 + i);
        let answer = request_code(&server, from, None, &number);
        match answer.status {
            202 => sent += 1,
            _ => {
                assert_refused_with_retry_time(&answer, &format!("code {i}"));
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 30,
        "only {refused} of 40 codes to sequential numbers from one /24 were refused"
    );
    assert_eq!(
        sms_sent(&server, None),
        sent,
        "an SMS went out for a refused request"
    );
    let (_, metrics) = crate::operations::get(server.metrics_port, "/metrics");
    assert!(
        metrics.contains("tidings_code_budget_trips_total{budget=\"number_prefix\"}"),
        "no metric for the tripped number-prefix budget:\n{metrics}"
    );
    let log = server.log();
    assert!(
        log.contains("code budget tripped") && log.contains("number_prefix"),
        "no log line for the tripped budget:\n{log}"
    );
    assert!(
        !log.contains("4915120000"),
        "the log holds a number:\n{log}"
    );
}

/// Behind a reverse proxy every client had one bucket, and an IPv6 /64 (2^64 addresses, one
/// customer's LAN) was unlimited. With the proxy's address trusted, the rightmost untrusted
/// `X-Forwarded-For` hop is the client, and every address of one /64 shares one limit; a client
/// elsewhere is not held back by it. From a peer that is not a trusted proxy the header is
/// ignored: the peer's own address counts.
#[test]
fn one_ipv6_64_behind_a_trusted_proxy_shares_one_limit() {
    let server = Server::start(&["--trusted-proxies", "127.0.0.1"]);
    let proxy = [127, 0, 0, 1];
    for i in 0..5 {
        let client = format!("2001:db8:1:2::{}", i + 1);
        let answer = request_code(&server, proxy, Some(&client), &spread_number(i));
        assert_eq!(answer.status, 202, "{client}: {answer:?}");
    }
    for i in 5..8 {
        let client = format!("2001:db8:1:2:{i}:{i}:{i}:{i}");
        let answer = request_code(&server, proxy, Some(&client), &spread_number(i));
        assert_refused_with_retry_time(&answer, &client);
    }
    // Another client behind the same proxy, whatever it claims further left in the chain.
    let answer = request_code(
        &server,
        proxy,
        Some("2001:db8:1:2::1, 2001:db8:9:1::1"),
        &spread_number(8),
    );
    assert_eq!(
        answer.status, 202,
        "another client behind the proxy: {answer:?}"
    );
    // A peer that is not a trusted proxy cannot pick its address with the header.
    let untrusted = [127, 0, 0, 3];
    for i in 0..5 {
        let claimed = format!("2001:db8:{}::1", 100 + i);
        let answer = request_code(&server, untrusted, Some(&claimed), &spread_number(10 + i));
        assert_eq!(
            answer.status, 202,
            "untrusted peer, request {i}: {answer:?}"
        );
    }
    let answer = request_code(
        &server,
        untrusted,
        Some("2001:db8:200::1"),
        &spread_number(20),
    );
    assert_refused_with_retry_time(&answer, "an untrusted peer's sixth request");
}

/// A full limiter table refused every new address for 5 minutes. Now the oldest entries are
/// forgotten: with room for 4 entries, 12 clients in turn are all served, and the newest is
/// still limited.
#[test]
fn a_full_limiter_table_forgets_the_oldest_entries_instead_of_refusing() {
    let server = Server::start(&["--trusted-proxies", "127.0.0.1", "--limiter-capacity", "4"]);
    let proxy = [127, 0, 0, 1];
    for i in 0..12 {
        let client = format!("10.{i}.0.1");
        let answer = request_code(&server, proxy, Some(&client), &spread_number(i));
        assert_eq!(answer.status, 202, "client {client}: {answer:?}");
    }
    for i in 12..16 {
        let answer = request_code(&server, proxy, Some("10.11.0.1"), &spread_number(i));
        assert_eq!(answer.status, 202, "request {i}: {answer:?}");
    }
    let answer = request_code(&server, proxy, Some("10.11.0.1"), &spread_number(16));
    assert_refused_with_retry_time(&answer, "the newest client's sixth request");
}

/// An operator who loosens the per-number code limits still cannot let one number be bombed:
/// at most 5 SMS a day reach one number, and the refusal says to come back in about a day.
#[test]
fn one_number_gets_at_most_five_sms_a_day() {
    let server = Server::start(&[
        "--code-interval-seconds",
        "0",
        "--codes-per-number",
        "100",
        "--codes-per-address",
        "100",
    ]);
    let n = number();
    for i in 0..5 {
        let answer = request_code(&server, [127, 0, 0, 1], None, &n);
        assert_eq!(answer.status, 202, "code {i}: {answer:?}");
    }
    let answer = request_code(&server, [127, 0, 0, 1], None, &n);
    assert_refused_with_retry_time(&answer, "the sixth code of the day");
    let seconds = answer.body["retry_after"].as_u64().unwrap_or(0);
    assert!(
        seconds > 20 * 3600 && seconds <= 24 * 3600,
        "retry after {seconds} s, not about a day"
    );
    assert_eq!(sms_sent(&server, Some(&n)), 5);
}

/// Premium-rate and shared-cost numbers earn whoever holds them money for every SMS: a code is
/// never sent to one, and nothing reaches the gateway.
#[test]
fn a_premium_rate_number_is_refused_without_an_sms() {
    let server = Server::start(&[]);
    for premium in ["+499001234567", "+449012345678"] {
        let answer = request_code(&server, [127, 0, 0, 1], None, premium);
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.body["error"], "unsupported_number", "{answer:?}");
    }
    assert_eq!(
        sms_sent(&server, None),
        0,
        "an SMS went to a premium-rate number"
    );
    let (_, metrics) = crate::operations::get(server.metrics_port, "/metrics");
    assert!(
        metrics.contains("tidings_code_budget_trips_total{budget=\"premium_rate\"} 2"),
        "no metric for the refused premium-rate numbers:\n{metrics}"
    );
}
