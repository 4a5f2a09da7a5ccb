//! XMPP (RFC 6120/6121) against ejabberd: a small purpose-built client over tokio, with quick-xml
//! to split the stream into stanzas. Login is the real sequence (stream, SASL PLAIN, stream
//! restart, resource binding), then XEP-0198 stream management (`<enable/>`, answering `<r/>`
//! with `<a h=…/>`) and initial presence. Messages ask for an XEP-0184 receipt, which the
//! receiver sends back, so the sender learns of the delivery as a Tidings sender does. Offline
//! users get their messages from ejabberd's offline storage (`mod_offline`) at login.

use std::borrow::Cow;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use base64::Engine as _;
use bytes::BytesMut;
use quick_xml::events::{BytesStart, Event as XmlEvent};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{self, StepStats, Tag, Window, LOGIN_TIMEOUT};
use crate::worker::{spawn_guarded, Ctx, DrainOutcome, PairLink, TaskGuard};

/// The XMPP domain of the benchmark's ejabberd.
pub const DOMAIN: &str = "localhost";
const SM: &str = "urn:xmpp:sm:3";

fn jid(index: u32) -> String {
    format!("{}@{DOMAIN}", common::digits(index))
}

fn stream_header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

/// One element of the stream, with what the drivers look at.
#[derive(Debug, Default, Clone)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    /// Whether this is a stanza that XEP-0198 counts.
    pub fn is_stanza(&self) -> bool {
        matches!(self.name.as_str(), "message" | "presence" | "iq")
    }
}

fn element_of(start: &BytesStart<'_>) -> Element {
    let mut element = Element {
        name: String::from_utf8_lossy(start.local_name().as_ref()).into_owned(),
        ..Element::default()
    };
    for attr in start.attributes().flatten() {
        let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned();
        let value = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .unwrap_or(Cow::Borrowed(""))
            .into_owned();
        element.attrs.push((key, value));
    }
    element
}

/// Splits the bytes of an XMPP stream into top-level elements. The stream header comes out as
/// an element named `stream`, the stream's end as `/stream`.
#[derive(Debug, Default)]
pub struct Splitter {
    pub buf: BytesMut,
}

impl Splitter {
    /// The next whole top-level element, if the buffer holds one.
    pub fn next(&mut self) -> anyhow::Result<Option<Element>> {
        let mut reader = quick_xml::Reader::from_reader(&self.buf[..]);
        reader.config_mut().check_end_names = false;
        let mut stack: Vec<Element> = Vec::new();
        loop {
            let event = match reader.read_event() {
                Ok(event) => event,
                Err(e) => {
                    if self.buf.len() > 4 * 1024 * 1024 {
                        bail!("XML stream: {e}");
                    }
                    return Ok(None);
                }
            };
            let finished = match event {
                XmlEvent::Start(start) => {
                    let element = element_of(&start);
                    if stack.is_empty() && element.name == "stream" {
                        Some(element)
                    } else {
                        stack.push(element);
                        None
                    }
                }
                XmlEvent::Empty(start) => {
                    let element = element_of(&start);
                    match stack.last_mut() {
                        Some(parent) => {
                            parent.children.push(element);
                            None
                        }
                        None => Some(element),
                    }
                }
                XmlEvent::End(_) => match stack.pop() {
                    None => Some(Element {
                        name: "/stream".into(),
                        ..Element::default()
                    }),
                    Some(element) => match stack.last_mut() {
                        Some(parent) => {
                            parent.children.push(element);
                            None
                        }
                        None => Some(element),
                    },
                },
                XmlEvent::Text(text) => {
                    if let Some(top) = stack.last_mut() {
                        if let Ok(text) = text.decode() {
                            top.text.push_str(&text);
                        }
                    }
                    None
                }
                XmlEvent::Eof => return Ok(None),
                _ => None,
            };
            if let Some(element) = finished {
                let consumed = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
                let _ = self.buf.split_to(consumed.min(self.buf.len()));
                return Ok(Some(element));
            }
        }
    }
}

/// A connection in the middle of (or after) login.
pub struct Conn {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
    pub xml: Splitter,
    /// Stanzas received since stream management was enabled.
    pub h: u32,
}

impl Conn {
    async fn open(ctx: &Ctx) -> anyhow::Result<Conn> {
        let stream = common::tcp_connect(ctx.endpoint.src_ip, ctx.endpoint.addr).await?;
        let (reader, writer) = stream.into_split();
        Ok(Conn {
            reader,
            writer,
            xml: Splitter::default(),
            h: 0,
        })
    }

    pub async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.writer.write_all(text.as_bytes()).await?;
        Ok(())
    }

    /// The next element, waiting until `deadline`.
    pub async fn next(&mut self, deadline: Instant) -> anyhow::Result<Element> {
        loop {
            if let Some(element) = self.xml.next()? {
                return Ok(element);
            }
            self.xml.buf.reserve(16 * 1024);
            let read = tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.xml.buf))
                .await
                .map_err(|_| anyhow!("ejabberd did not answer in time"))??;
            if read == 0 {
                bail!("ejabberd closed the stream");
            }
        }
    }

    /// Waits for an element named `name`, failing on a stream error or a SASL failure.
    async fn expect(&mut self, name: &str, deadline: Instant) -> anyhow::Result<Element> {
        loop {
            let element = self.next(deadline).await?;
            if element.name == name {
                return Ok(element);
            }
            match element.name.as_str() {
                "error" | "failure" | "/stream" => {
                    let detail = element
                        .children
                        .first()
                        .map(|c| c.name.clone())
                        .unwrap_or_default();
                    bail!(
                        "ejabberd answered <{}> {detail} while waiting for <{name}>",
                        element.name
                    )
                }
                _ => {}
            }
        }
    }

    /// Waits for the iq answering `id`.
    async fn expect_iq(&mut self, id: &str, deadline: Instant) -> anyhow::Result<Element> {
        loop {
            let element = self.expect("iq", deadline).await?;
            if element.attr("id") == Some(id) {
                if element.attr("type") == Some("error") {
                    let reason = element
                        .child("error")
                        .and_then(|e| e.children.first())
                        .map(|c| c.name.clone())
                        .unwrap_or_default();
                    bail!("iq {id} failed: {reason}");
                }
                return Ok(element);
            }
        }
    }

    /// Closes the stream and waits (briefly) for the server to close its side.
    pub async fn close(mut self) {
        let _ = self.send("</stream:stream>").await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match self.next(Instant::now() + Duration::from_secs(5)).await {
                    Ok(e) if e.name == "/stream" => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        })
        .await;
        let _ = self.writer.shutdown().await;
    }
}

/// Logs user `index` in: stream, SASL PLAIN, restart, bind; then, as asked, stream management
/// and initial presence.
pub async fn login(ctx: &Ctx, index: u32, sm: bool, presence: bool) -> anyhow::Result<Conn> {
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    let mut conn = Conn::open(ctx).await?;
    conn.send(&stream_header()).await?;
    conn.expect("features", deadline).await?;
    let credentials = format!("\0{}\0{}", common::digits(index), common::password(index));
    let auth = format!(
        "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    );
    conn.send(&auth).await?;
    conn.expect("success", deadline).await?;
    conn.send(&stream_header()).await?;
    conn.expect("features", deadline).await?;
    conn.send(
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
         <resource>bench</resource></bind></iq>",
    )
    .await?;
    conn.expect_iq("bind", deadline).await?;
    if sm {
        conn.send(&format!("<enable xmlns='{SM}'/>")).await?;
        conn.expect("enabled", deadline).await?;
        conn.h = 0;
    }
    if presence {
        conn.send("<presence/>").await?;
    }
    Ok(conn)
}

/// Creates accounts by in-band registration (XEP-0077), several per connection.
pub async fn register(ctx: &Ctx, indices: &[u32]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut conn = Conn::open(ctx).await?;
    conn.send(&stream_header()).await?;
    conn.expect("features", deadline).await?;
    for &index in indices {
        let id = format!("reg{index}");
        conn.send(&format!(
            "<iq type='set' id='{id}'><query xmlns='jabber:iq:register'>\
             <username>{}</username><password>{}</password></query></iq>",
            common::digits(index),
            common::password(index)
        ))
        .await?;
        match conn.expect_iq(&id, deadline).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("conflict") => {}
            Err(e) => return Err(e),
        }
    }
    conn.close().await;
    Ok(())
}

/// Puts the phonebook into user `owner`'s roster (the server-side contact list).
pub async fn fill_roster(ctx: &Ctx, owner: u32, roster: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut conn = login(ctx, owner, false, false).await?;
    let mut out = String::new();
    for (j, contact) in roster.iter().enumerate() {
        out.push_str(&format!(
            "<iq type='set' id='ros{j}'><query xmlns='jabber:iq:roster'><item jid='{contact}@{DOMAIN}'/></query></iq>"
        ));
    }
    conn.send(&out).await?;
    let mut answered = 0;
    while answered < roster.len() {
        let element = conn.expect("iq", deadline).await?;
        let id = element.attr("id").unwrap_or("");
        if id.starts_with("ros") {
            if element.attr("type") == Some("error") {
                bail!("roster set refused for user {owner}");
            }
            answered += 1;
        } else if element.attr("type") == Some("set") {
            // A roster push: answer it as a client must.
            conn.send(&format!("<iq type='result' id='{id}'/>")).await?;
        }
    }
    conn.close().await;
    Ok(())
}

enum Out {
    Raw(String),
    Message { tag: Tag },
}

async fn writer_task(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    to: Option<String>,
    stats: Option<Rc<StepStats>>,
) {
    let mut out = String::with_capacity(16 * 1024);
    loop {
        let first = tokio::select! {
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
            // Whitespace keepalive, as XMPP clients do.
            () = tokio::time::sleep(Duration::from_secs(60)) => Out::Raw(" ".into()),
        };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Out::Raw(text) => out.push_str(&text),
                Out::Message { tag } => {
                    let hex = tag.to_hex();
                    // A 64-byte body, as for every target.
                    out.push_str(&format!(
                        "<message to='{}' id='{hex}' type='chat'><body>{hex}{}</body>\
                         <request xmlns='urn:xmpp:receipts'/></message>",
                        to.as_deref().unwrap_or(""),
                        "x".repeat(common::PAYLOAD_BYTES - hex.len())
                    ));
                    if let Some(stats) = &stats {
                        if tag.step == stats.step.get() {
                            stats.sent.set(stats.sent.get() + 1);
                        }
                    }
                }
            }
            if out.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if writer.write_all(out.as_bytes()).await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = writer.write_all(b"</stream:stream>").await;
    let _ = writer.shutdown().await;
}

/// Reads stanzas until the stream ends; answers `<r/>` with the count of stanzas received.
async fn read_stanzas(
    mut reader: OwnedReadHalf,
    mut xml: Splitter,
    tx: mpsc::UnboundedSender<Out>,
    mut h: u32,
    mut handle: impl FnMut(&Element),
) -> anyhow::Result<()> {
    loop {
        while let Some(element) = xml.next()? {
            if element.is_stanza() {
                h = h.wrapping_add(1);
                handle(&element);
            } else if element.name == "r" {
                let _ = tx.send(Out::Raw(format!("<a xmlns='{SM}' h='{h}'/>")));
            } else if element.name == "/stream" {
                bail!("ejabberd closed the stream");
            }
        }
        xml.buf.reserve(16 * 1024);
        if reader.read_buf(&mut xml.buf).await? == 0 {
            bail!("ejabberd closed the connection");
        }
    }
}

/// Logs in a user (stream management on, available) and holds it until dropped.
pub async fn hold(ctx: &Ctx, index: u32) -> anyhow::Result<TaskGuard> {
    let conn = login(ctx, index, true, true).await?;
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = spawn_guarded(writer_task(conn.writer, rx, None, None));
    let reader = spawn_guarded(async move {
        let _ = read_stanzas(conn.reader, conn.xml, tx, conn.h, |_| {}).await;
    });
    Ok(TaskGuard::many(vec![writer, reader]))
}

fn message_tag(element: &Element) -> Option<Tag> {
    if element.name != "message" {
        return None;
    }
    element
        .child("body")
        .and_then(|b| Tag::from_hex(&b.text))
        .or_else(|| element.attr("id").and_then(Tag::from_hex))
        .filter(|_| element.child("body").is_some())
}

fn receipt_tag(element: &Element) -> Option<Tag> {
    if element.name != "message" {
        return None;
    }
    element
        .child("received")
        .and_then(|r| r.attr("id"))
        .and_then(Tag::from_hex)
}

/// Connects one relay pair (sender `2p`, receiver `2p+1`).
pub async fn relay_pair(
    ctx: &Ctx,
    pair: u32,
    stats: Rc<StepStats>,
    window: Rc<Window>,
) -> anyhow::Result<PairLink> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let receiver = login(ctx, receiver_index, true, true).await?;
    let sender = login(ctx, sender_index, true, true).await?;

    let (rtx, rrx) = mpsc::unbounded_channel::<Out>();
    let receiver_writer = spawn_guarded(writer_task(receiver.writer, rrx, None, None));
    let receiver_stats = Rc::clone(&stats);
    let rtx_reader = rtx.clone();
    let receiver_reader = spawn_guarded(async move {
        let result = read_stanzas(
            receiver.reader,
            receiver.xml,
            rtx.clone(),
            receiver.h,
            |element| {
                if let Some(tag) = message_tag(element) {
                    receiver_stats.on_deliver(tag);
                    let from = element.attr("from").unwrap_or("");
                    let hex = tag.to_hex();
                    let _ = rtx_reader.send(Out::Raw(format!(
                        "<message to='{from}' id='r{hex}'><received xmlns='urn:xmpp:receipts' id='{hex}'/></message>"
                    )));
                }
            },
        )
        .await;
        if let Err(e) = result {
            receiver_stats.error(format!("receiver {receiver_index}: {e:#}"));
        }
    });

    let (stx, srx) = mpsc::unbounded_channel::<Out>();
    let sender_writer = spawn_guarded(writer_task(
        sender.writer,
        srx,
        Some(jid(receiver_index)),
        Some(Rc::clone(&stats)),
    ));
    let sender_stats = Rc::clone(&stats);
    let stx_reader = stx.clone();
    let sender_reader = spawn_guarded(async move {
        let result = read_stanzas(sender.reader, sender.xml, stx_reader, sender.h, |element| {
            if let Some(tag) = receipt_tag(element) {
                if sender_stats.on_receipt(tag) {
                    window.give();
                }
            }
        })
        .await;
        if let Err(e) = result {
            sender_stats.error(format!("sender {sender_index}: {e:#}"));
        }
    });
    Ok(PairLink {
        send: Box::new(move |tag| stx.send(Out::Message { tag }).is_ok()),
        _guards: TaskGuard::many(vec![
            receiver_writer,
            receiver_reader,
            sender_writer,
            sender_reader,
        ]),
    })
}

/// Sends `per_pair` messages to the offline receiver (ejabberd stores them with `mod_offline`)
/// and waits until stream management acknowledged every one.
pub async fn store(ctx: &Ctx, pair: u32, per_pair: u32) -> anyhow::Result<u64> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let mut conn = login(ctx, sender_index, true, false).await?;
    let to = jid(receiver_index);
    let mut out = String::new();
    for seq in 0..per_pair {
        let hex = Tag {
            step: 0,
            pair,
            seq,
            t_ns: 0,
        }
        .to_hex();
        out.push_str(&format!(
            "<message to='{to}' id='{hex}' type='chat'><body>{hex}{}</body></message>",
            "x".repeat(common::PAYLOAD_BYTES - hex.len())
        ));
    }
    out.push_str(&format!("<r xmlns='{SM}'/>"));
    conn.send(&out).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let element = conn.next(deadline).await?;
        if element.is_stanza() {
            conn.h = conn.h.wrapping_add(1);
        }
        match element.name.as_str() {
            "a" => {
                let h: u32 = element.attr("h").and_then(|h| h.parse().ok()).unwrap_or(0);
                if h >= per_pair {
                    break;
                }
                conn.send(&format!("<r xmlns='{SM}'/>")).await?;
            }
            "r" => {
                let h = conn.h;
                conn.send(&format!("<a xmlns='{SM}' h='{h}'/>")).await?;
            }
            "/stream" => bail!("ejabberd closed the sender's stream"),
            _ => {}
        }
    }
    conn.close().await;
    Ok(u64::from(per_pair))
}

/// Logs the receiver in (available, stream management on) and takes every offline message.
pub async fn drain(
    ctx: &Ctx,
    pair: u32,
    per_pair: u32,
    clock: common::Clock,
    on_message: &dyn Fn(),
) -> anyhow::Result<DrainOutcome> {
    let receiver_index = 2 * pair + 1;
    let mut conn = login(ctx, receiver_index, true, true).await?;
    let mut seen = vec![false; per_pair as usize];
    let mut outcome = DrainOutcome::default();
    loop {
        let element = conn
            .next(Instant::now() + Duration::from_secs(30))
            .await
            .map_err(|e| {
                anyhow!(
                    "receiver {receiver_index}: {e:#} after {} of {per_pair}",
                    outcome.received
                )
            })?;
        if element.is_stanza() {
            conn.h = conn.h.wrapping_add(1);
        }
        if let Some(tag) = message_tag(&element) {
            match seen.get_mut(tag.seq as usize) {
                Some(slot) if !*slot => {
                    *slot = true;
                    outcome.received += 1;
                    on_message();
                }
                _ => outcome.duplicates += 1,
            }
        } else if element.name == "r" {
            let h = conn.h;
            conn.send(&format!("<a xmlns='{SM}' h='{h}'/>")).await?;
        } else if element.name == "/stream" {
            bail!("ejabberd closed the receiver's stream");
        }
        if outcome.received >= u64::from(per_pair) {
            // Acknowledge everything received, unasked (XEP-0198 allows it).
            let h = conn.h;
            conn.send(&format!("<a xmlns='{SM}' h='{h}'/>")).await?;
            outcome.done_ns = clock.ns();
            break;
        }
    }
    conn.close().await;
    Ok(outcome)
}

/// ejabberd's nearest equivalent of a lookup: fetching the user's stored roster (the server
/// keeps the phonebook; the answer says who is in it, not who is reachable).
pub async fn lookup_loop(
    ctx: &Ctx,
    client: u32,
    until: Instant,
) -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
    let mut conn = login(ctx, client, false, true).await?;
    let mut hist = common::histogram();
    let (mut requests, mut numbers) = (0u64, 0u64);
    let counter = Cell::new(0u64);
    while Instant::now() < until {
        counter.set(counter.get() + 1);
        let id = format!("q{}", counter.get());
        let started = Instant::now();
        conn.send(&format!(
            "<iq type='get' id='{id}'><query xmlns='jabber:iq:roster'/></iq>"
        ))
        .await?;
        let answer = conn
            .expect_iq(&id, Instant::now() + Duration::from_secs(30))
            .await?;
        common::record_ns(
            &mut hist,
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        );
        requests += 1;
        numbers += answer.child("query").map_or(0, |q| {
            q.children.iter().filter(|c| c.name == "item").count()
        }) as u64;
    }
    conn.close().await;
    Ok((requests, numbers, hist))
}
