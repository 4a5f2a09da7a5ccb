//! MQTT 3.1.1 against Mosquitto, with rumqttc's packet codec (`rumqttc::mqttbytes::v4`) over our
//! own sockets (so that each can be bound to a chosen source address and pipelined).
//!
//! A user is client id = its digits, username/password from the broker's password file, a
//! persistent session (clean session off) subscribed at QoS 1 to `u/<digits>`. Messages are QoS 1
//! PUBLISHes to the receiver's topic; the receiver answers PUBACK and publishes a receipt (QoS 1)
//! to the sender's topic, so the sender learns of the delivery as a Tidings sender does.

use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    self, ConnectReturnCode, Disconnect, Packet, PingReq, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{self, StepStats, Tag, Window, KIND_MESSAGE, KIND_RECEIPT, LOGIN_TIMEOUT};
use crate::worker::{spawn_guarded, Ctx, DrainOutcome, PairLink, TaskGuard};

const MAX_PACKET: usize = 1024 * 1024;
/// Keep-alive asked for in CONNECT; the client pings at half of it when silent.
const KEEP_ALIVE_SECS: u16 = 60;

fn topic(index: u32) -> String {
    format!("u/{}", common::digits(index))
}

/// Takes one whole packet off `buf`, if one is there.
fn next_packet(buf: &mut BytesMut) -> anyhow::Result<Option<Packet>> {
    match v4::read(buf, MAX_PACKET) {
        Ok(packet) => Ok(Some(packet)),
        Err(MqttError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(anyhow!("MQTT decode: {e}")),
    }
}

fn write(packet: &Packet, out: &mut BytesMut) {
    let _ = match packet {
        Packet::Publish(p) => p.write(out),
        Packet::PubAck(p) => p.write(out),
        Packet::Subscribe(p) => p.write(out),
        Packet::Connect(p) => p.write(out),
        Packet::PingReq => PingReq.write(out),
        Packet::Disconnect => Disconnect.write(out),
        _ => Ok(0),
    };
}

/// A logged-in MQTT connection.
pub struct Conn {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
    pub buf: BytesMut,
}

/// Connects user `index`; `clean` asks for a clean session; `subscribe` subscribes its topic.
pub async fn login(ctx: &Ctx, index: u32, clean: bool, subscribe: bool) -> anyhow::Result<Conn> {
    let stream = common::tcp_connect(ctx.endpoint.src_ip, ctx.endpoint.addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let mut connect = v4::Connect::new(common::digits(index));
    connect.keep_alive = KEEP_ALIVE_SECS;
    connect.clean_session = clean;
    connect.set_login(common::digits(index), common::password(index));
    let mut out = BytesMut::new();
    write(&Packet::Connect(connect), &mut out);
    if subscribe {
        let mut sub = Subscribe::new(topic(index), QoS::AtLeastOnce);
        sub.pkid = 1;
        write(&Packet::Subscribe(sub), &mut out);
    }
    writer.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut connected = false;
    let deadline = Instant::now() + LOGIN_TIMEOUT;
    loop {
        while let Some(packet) = next_packet(&mut buf)? {
            match packet {
                Packet::ConnAck(ack) => {
                    if ack.code != ConnectReturnCode::Success {
                        bail!("CONNACK refused: {:?}", ack.code);
                    }
                    connected = true;
                    if !subscribe {
                        return Ok(Conn {
                            reader,
                            writer,
                            buf,
                        });
                    }
                }
                Packet::SubAck(_) if connected => {
                    return Ok(Conn {
                        reader,
                        writer,
                        buf,
                    })
                }
                other => bail!("unexpected packet during login: {other:?}"),
            }
        }
        let read = tokio::time::timeout_at(deadline, reader.read_buf(&mut buf))
            .await
            .map_err(|_| anyhow!("MQTT login timed out"))??;
        if read == 0 {
            bail!("the broker closed the connection during login");
        }
    }
}

enum Out {
    Packet(Packet),
    /// A message (to `topic`) or a receipt, encoded by the writer with its next packet id.
    Publish {
        payload: Vec<u8>,
    },
}

fn next_pkid(pkid: &mut u16) -> u16 {
    *pkid = if *pkid >= u16::MAX - 1 { 2 } else { *pkid + 1 };
    *pkid
}

async fn writer_task(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    topic: Option<String>,
    stats: Option<Rc<StepStats>>,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut pkid = 1u16;
    loop {
        let first = tokio::select! {
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
            () = tokio::time::sleep(Duration::from_secs(u64::from(KEEP_ALIVE_SECS / 2))) => Out::Packet(Packet::PingReq),
        };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Out::Packet(packet) => write(&packet, &mut out),
                Out::Publish { payload } => {
                    let mut publish = Publish::from_bytes(
                        topic.clone().unwrap_or_default(),
                        QoS::AtLeastOnce,
                        Bytes::from(payload),
                    );
                    publish.pkid = next_pkid(&mut pkid);
                    let _ = publish.write(&mut out);
                    if let (Some(stats), Some((KIND_MESSAGE, tag))) =
                        (&stats, common::parse_payload(&publish.payload))
                    {
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
        if writer.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = writer.write_all(&[0xE0, 0x00]).await;
    let _ = writer.shutdown().await;
}

async fn read_packets(
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    mut handle: impl FnMut(Packet) -> bool,
) -> anyhow::Result<()> {
    loop {
        while let Some(packet) = next_packet(&mut buf)? {
            if !handle(packet) {
                return Ok(());
            }
        }
        buf.reserve(16 * 1024);
        if reader.read_buf(&mut buf).await? == 0 {
            bail!("the broker closed the connection");
        }
    }
}

/// Logs in a user (persistent session, subscribed) and holds it until dropped.
pub async fn hold(ctx: &Ctx, index: u32) -> anyhow::Result<TaskGuard> {
    let conn = login(ctx, index, false, true).await?;
    Ok(keep(conn))
}

/// Reconnects a user held before to its persistent session: CONNECT without a clean session and
/// without SUBSCRIBE (the broker kept the subscription), MQTT's nearest to a resumed session.
pub async fn reconnect(ctx: &Ctx, index: u32) -> anyhow::Result<TaskGuard> {
    let conn = login(ctx, index, false, false).await?;
    Ok(keep(conn))
}

/// Keeps a connection alive (acknowledging what arrives) until the guard is dropped.
fn keep(conn: Conn) -> TaskGuard {
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = spawn_guarded(writer_task(conn.writer, rx, None, None));
    let reader = spawn_guarded(async move {
        let _ = read_packets(conn.reader, conn.buf, |packet| {
            if let Packet::Publish(p) = packet {
                let _ = tx.send(Out::Packet(Packet::PubAck(PubAck::new(p.pkid))));
            }
            true
        })
        .await;
    });
    TaskGuard::many(vec![writer, reader])
}

/// Connects one relay pair (sender `2p`, receiver `2p+1`).
pub async fn relay_pair(
    ctx: &Ctx,
    pair: u32,
    stats: Rc<StepStats>,
    window: Rc<Window>,
) -> anyhow::Result<PairLink> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let receiver = login(ctx, receiver_index, false, true).await?;
    let sender = login(ctx, sender_index, false, true).await?;

    let (rtx, rrx) = mpsc::unbounded_channel::<Out>();
    let receiver_writer = spawn_guarded(writer_task(
        receiver.writer,
        rrx,
        Some(topic(sender_index)),
        None,
    ));
    let receiver_stats = Rc::clone(&stats);
    let receiver_reader = spawn_guarded(async move {
        let result = read_packets(receiver.reader, receiver.buf, |packet| {
            if let Packet::Publish(p) = packet {
                if p.qos != QoS::AtMostOnce {
                    let _ = rtx.send(Out::Packet(Packet::PubAck(PubAck::new(p.pkid))));
                }
                if let Some((KIND_MESSAGE, tag)) = common::parse_payload(&p.payload) {
                    receiver_stats.on_deliver(tag);
                    let _ = rtx.send(Out::Publish {
                        payload: common::receipt_payload(tag),
                    });
                }
            }
            true
        })
        .await;
        if let Err(e) = result {
            receiver_stats.error(format!("receiver {receiver_index}: {e:#}"));
        }
    });

    let (stx, srx) = mpsc::unbounded_channel::<Out>();
    let sender_writer = spawn_guarded(writer_task(
        sender.writer,
        srx,
        Some(topic(receiver_index)),
        Some(Rc::clone(&stats)),
    ));
    let sender_stats = Rc::clone(&stats);
    let stx_reader = stx.clone();
    let sender_reader = spawn_guarded(async move {
        let result = read_packets(sender.reader, sender.buf, |packet| {
            if let Packet::Publish(p) = packet {
                if p.qos != QoS::AtMostOnce {
                    let _ = stx_reader.send(Out::Packet(Packet::PubAck(PubAck::new(p.pkid))));
                }
                if let Some((KIND_RECEIPT, tag)) = common::parse_payload(&p.payload) {
                    if sender_stats.on_receipt(tag) {
                        window.give();
                    }
                }
            }
            true
        })
        .await;
        if let Err(e) = result {
            sender_stats.error(format!("sender {sender_index}: {e:#}"));
        }
    });
    Ok(PairLink {
        send: Box::new(move |tag: Tag| {
            stx.send(Out::Publish {
                payload: common::message_payload(tag),
            })
            .is_ok()
        }),
        _guards: TaskGuard::many(vec![
            receiver_writer,
            receiver_reader,
            sender_writer,
            sender_reader,
        ]),
    })
}

/// Makes the receiver an offline user: a persistent session subscribed at QoS 1, then gone.
pub async fn make_offline(ctx: &Ctx, receiver_index: u32) -> anyhow::Result<()> {
    let mut conn = login(ctx, receiver_index, false, true).await?;
    conn.writer.write_all(&[0xE0, 0x00]).await?;
    let _ = conn.writer.shutdown().await;
    // Wait for the broker to close, so the session is stored as disconnected.
    let mut scratch = BytesMut::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while matches!(conn.reader.read_buf(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
    Ok(())
}

/// Publishes `per_pair` QoS 1 messages to the disconnected receiver; waits for every PUBACK.
pub async fn store(ctx: &Ctx, pair: u32, per_pair: u32) -> anyhow::Result<u64> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let mut conn = login(ctx, sender_index, true, false).await?;
    let mut out = BytesMut::new();
    for seq in 0..per_pair {
        let tag = Tag {
            step: 0,
            pair,
            seq,
            t_ns: 0,
        };
        let mut publish = Publish::from_bytes(
            topic(receiver_index),
            QoS::AtLeastOnce,
            Bytes::from(common::message_payload(tag)),
        );
        publish.pkid = u16::try_from(seq % 65_000 + 1).unwrap_or(1);
        let _ = publish.write(&mut out);
    }
    conn.writer.write_all(&out).await?;
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < u64::from(per_pair) {
        while let Some(packet) = next_packet(&mut conn.buf)? {
            if let Packet::PubAck(_) = packet {
                acked += 1;
            }
        }
        if acked >= u64::from(per_pair) {
            break;
        }
        let read = tokio::time::timeout_at(deadline, conn.reader.read_buf(&mut conn.buf))
            .await
            .map_err(|_| anyhow!("store: PUBACKs missing after 120 s"))??;
        if read == 0 {
            bail!("the broker closed the sender's connection");
        }
    }
    conn.writer.write_all(&[0xE0, 0x00]).await?;
    let _ = conn.writer.shutdown().await;
    Ok(acked)
}

/// Reconnects the receiver's persistent session and acknowledges every queued message.
pub async fn drain(
    ctx: &Ctx,
    pair: u32,
    per_pair: u32,
    clock: common::Clock,
    on_message: &dyn Fn(),
) -> anyhow::Result<DrainOutcome> {
    let receiver_index = 2 * pair + 1;
    let mut conn = login(ctx, receiver_index, false, false).await?;
    let mut seen = vec![false; per_pair as usize];
    let mut outcome = DrainOutcome::default();
    let mut out = BytesMut::new();
    loop {
        while let Some(packet) = next_packet(&mut conn.buf)? {
            if let Packet::Publish(p) = packet {
                if let Some((KIND_MESSAGE, tag)) = common::parse_payload(&p.payload) {
                    match seen.get_mut(tag.seq as usize) {
                        Some(slot) if !*slot => {
                            *slot = true;
                            outcome.received += 1;
                            on_message();
                        }
                        _ => outcome.duplicates += 1,
                    }
                }
                write(&Packet::PubAck(PubAck::new(p.pkid)), &mut out);
            }
        }
        if !out.is_empty() {
            conn.writer.write_all(&out).await?;
            out.clear();
        }
        if outcome.received >= u64::from(per_pair) {
            outcome.done_ns = clock.ns();
            break;
        }
        let read =
            tokio::time::timeout(Duration::from_secs(30), conn.reader.read_buf(&mut conn.buf))
                .await
                .map_err(|_| {
                    anyhow!(
                        "receiver {receiver_index}: nothing for 30 s after {} of {per_pair}",
                        outcome.received
                    )
                })??;
        if read == 0 {
            bail!("the broker closed the receiver's connection");
        }
    }
    conn.writer.write_all(&[0xE0, 0x00]).await?;
    let _ = conn.writer.shutdown().await;
    Ok(outcome)
}
