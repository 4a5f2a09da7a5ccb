//! Tidings' own protocol, as a real client speaks it: registration over HTTP with the code from
//! the outbox gateway, `GET /v1/connect` with `Upgrade: tidings/3`, a `Login` signed over the
//! server's challenge, then length-prefixed protobuf frames (`tidings_proto::codec`). Nothing
//! here takes a path a client could not take: a receiver or a phonebook is named by the pseudonyms
//! a client derives by blinding the numbers (`Evaluate`, checked against `GET /v1/oprf-key`).

use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::{Bytes, BytesMut};
use ed25519_dalek::Signer as _;
use tidings_proto::codec;
use tidings_proto::frame::{self, Frame, Kind, SendMode, SendOutcome};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{self, BoxIo, StepStats, Tag, Window, LOGIN_TIMEOUT};
use crate::worker::{spawn_guarded, Ctx, DrainOutcome, PairLink, TaskGuard};

/// How often an otherwise silent client sends `Ping` (the server's default heartbeat is 10 s
/// and it closes a session silent for three).
const PING_EVERY: Duration = Duration::from_secs(8);

/// The device ids of the benchmark users, by index.
pub fn load_devices(path: &Path) -> anyhow::Result<Vec<[u8; 16]>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read device list {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bytes = tidings_proto::id::from_text(line)
            .ok_or_else(|| anyhow!("device list line {}: not base64url", i + 1))?;
        let id: [u8; 16] = bytes
            .try_into()
            .map_err(|_| anyhow!("device list line {}: not 16 bytes", i + 1))?;
        out.push(id);
    }
    Ok(out)
}

fn device(ctx: &Ctx, index: u32) -> anyhow::Result<[u8; 16]> {
    ctx.devices
        .as_ref()
        .and_then(|d| d.get(index as usize).copied())
        .ok_or_else(|| anyhow!("user {index} has no registered device"))
}

/// The address of the node a connection goes to: user `index`'s node (so that a user's
/// reconnect, with the resumption token its node issued, reaches that node again; both ends of a
/// relay pair on one node with `pairs_on_one_node`), or the nodes in turn.
fn node_addr(ctx: &Ctx, index: Option<u32>) -> std::net::SocketAddr {
    thread_local! {
        static OPENED: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
    }
    let nodes = ctx.endpoint.nodes.max(1);
    let k = match index {
        Some(index) => {
            let spread = if ctx.endpoint.pairs_on_one_node {
                index / 2
            } else {
                index
            };
            u16::try_from(spread % u32::from(nodes)).unwrap_or(0)
        }
        None => OPENED.with(|opened| {
            let k = opened.get();
            opened.set(k.wrapping_add(1));
            k % nodes
        }),
    };
    let mut addr = ctx.endpoint.addr;
    addr.set_port(addr.port() + 100 * k);
    addr
}

/// Opens the byte stream: TCP from the worker's source address, then TLS if pinned.
async fn open(ctx: &Ctx, index: Option<u32>) -> anyhow::Result<BoxIo> {
    let tcp = common::tcp_connect(ctx.endpoint.src_ip, node_addr(ctx, index)).await?;
    match &ctx.tls {
        None => Ok(Box::new(tcp)),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::IpAddress(ctx.endpoint.addr.ip().into());
            let tls = tokio::time::timeout(LOGIN_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| anyhow!("TLS handshake timed out"))?
                .context("TLS handshake")?;
            Ok(Box::new(tls))
        }
    }
}

/// Reads an HTTP response head; returns the status, the headers (lower-case names) and any
/// bytes that followed the head.
async fn read_head(io: &mut BoxIo) -> anyhow::Result<(u16, HashMap<String, String>, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| anyhow!("bad status line"))?;
            let mut headers = HashMap::new();
            for line in lines {
                if let Some((name, value)) = line.split_once(':') {
                    headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
                }
            }
            let rest = buf.split_off(end + 4);
            return Ok((status, headers, rest));
        }
        if buf.len() > 64 * 1024 {
            bail!("response head too large");
        }
        if io.read_buf(&mut buf).await? == 0 {
            bail!("the server closed the connection during the HTTP exchange");
        }
    }
}

/// One HTTP/1.1 JSON POST on a kept-alive connection.
async fn post_json(
    io: &mut BoxIo,
    host: &str,
    path: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(u16, serde_json::Value)> {
    http_json(io, "POST", host, path, &body.to_string()).await
}

/// One HTTP/1.1 request with a JSON answer on a kept-alive connection.
async fn http_json(
    io: &mut BoxIo,
    method: &str,
    host: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let (status, headers, mut rest) = read_head(io).await?;
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while rest.len() < length {
        if io.read_buf(&mut rest).await? == 0 {
            bail!("the server closed the connection in a response body");
        }
    }
    let value = if length == 0 {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&rest[..length]).unwrap_or(serde_json::Value::Null)
    };
    Ok((status, value))
}

/// Registers users `first..first+count`: asks for a code for each, reads the codes from the
/// outbox gateway's files, verifies each with its device key. Returns the device ids in order.
pub async fn register(
    ctx: &Ctx,
    first: u32,
    count: u32,
    concurrency: usize,
    outbox: &Path,
    progress: &dyn Fn(u64, u64),
) -> anyhow::Result<Vec<[u8; 16]>> {
    let host = ctx.endpoint.addr.to_string();
    let indices: Vec<u32> = (first..first + count).collect();
    let chunks: Vec<Vec<u32>> = indices
        .chunks(indices.len().div_ceil(concurrency.max(1)).max(1))
        .map(<[u32]>::to_vec)
        .collect();
    // Step 1: codes.
    let done = Rc::new(std::cell::Cell::new(0u64));
    let total = u64::from(count) * 3;
    let mut tasks = Vec::new();
    for chunk in chunks.clone() {
        let ctx = ctx.clone();
        let host = host.clone();
        let done = Rc::clone(&done);
        tasks.push(tokio::task::spawn_local(async move {
            let mut io = open(&ctx, None).await?;
            for index in chunk {
                let (status, body) = post_json(
                    &mut io,
                    &host,
                    "/v1/registration/code",
                    &serde_json::json!({ "number": common::number(index) }),
                )
                .await?;
                if status != 202 {
                    bail!("code request for user {index}: HTTP {status} {body}");
                }
                done.set(done.get() + 1);
            }
            anyhow::Ok(())
        }));
    }
    let mut last = Instant::now();
    for task in tasks {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if last.elapsed() > Duration::from_secs(1) {
                progress(done.get(), total);
                last = Instant::now();
            }
        }
        task.await.map_err(|e| anyhow!("{e}"))??;
    }
    // Step 2: the codes, as the SMS gateway wrote them.
    let wanted: HashMap<String, u32> = indices.iter().map(|&i| (common::number(i), i)).collect();
    let mut codes: HashMap<u32, String> = HashMap::new();
    for entry in std::fs::read_dir(outbox).context("outbox")? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(sms) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let (Some(to), Some(body)) = (sms["to"].as_str(), sms["text"].as_str()) else {
            continue;
        };
        if let Some(&index) = wanted.get(to) {
            let code: String = body
                .split("code is ")
                .nth(1)
                .unwrap_or("")
                .chars()
                .take(6)
                .collect();
            codes.insert(index, code);
        }
    }
    if codes.len() != indices.len() {
        bail!(
            "the outbox holds codes for {} of {} users",
            codes.len(),
            indices.len()
        );
    }
    let codes = Rc::new(codes);
    // Step 3: verify.
    let mut tasks = Vec::new();
    for chunk in chunks {
        let ctx = ctx.clone();
        let host = host.clone();
        let codes = Rc::clone(&codes);
        let done = Rc::clone(&done);
        tasks.push(tokio::task::spawn_local(async move {
            let mut io = open(&ctx, None).await?;
            let mut out = Vec::new();
            for index in chunk {
                let key = common::device_key(index);
                let public = key.verifying_key().to_bytes();
                let number = common::number(index);
                let code = codes.get(&index).cloned().unwrap_or_default();
                let signature = key.sign(&tidings_proto::transcript::register(
                    &number, &code, &public,
                ));
                let (status, body) = post_json(
                    &mut io,
                    &host,
                    "/v1/registration/verify",
                    &serde_json::json!({
                        "number": number,
                        "code": code,
                        "device_key": tidings_proto::id::to_text(&public),
                        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
                    }),
                )
                .await?;
                if status != 200 {
                    bail!("verify for user {index}: HTTP {status} {body}");
                }
                let id = body["device_id"]
                    .as_str()
                    .and_then(tidings_proto::id::from_text)
                    .and_then(|b| <[u8; 16]>::try_from(b).ok())
                    .ok_or_else(|| anyhow!("verify for user {index}: no device id"))?;
                out.push((index, id));
                done.set(done.get() + 1);
            }
            anyhow::Ok(out)
        }));
    }
    let mut ids = HashMap::new();
    for task in tasks {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if last.elapsed() > Duration::from_secs(1) {
                progress(done.get(), total);
                last = Instant::now();
            }
        }
        for (index, id) in task.await.map_err(|e| anyhow!("{e}"))?? {
            ids.insert(index, id);
        }
    }
    // Step 4: each device publishes its identity keys and a fallback key, as a client does at its
    // first login; a receiver none of whose devices has published keys cannot be sent to.
    let ids = Rc::new(ids);
    let mut tasks = Vec::new();
    for chunk in indices
        .chunks(indices.len().div_ceil(concurrency.max(1)).max(1))
        .map(<[u32]>::to_vec)
    {
        let ctx = ctx.clone();
        let ids = Rc::clone(&ids);
        let done = Rc::clone(&done);
        tasks.push(tokio::task::spawn_local(async move {
            for index in chunk {
                let device = ids
                    .get(&index)
                    .copied()
                    .ok_or_else(|| anyhow!("user {index} not verified"))?;
                publish_keys(&ctx, index, device).await?;
                done.set(done.get() + 1);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if last.elapsed() > Duration::from_secs(1) {
                progress(done.get(), total);
                last = Instant::now();
            }
        }
        task.await.map_err(|e| anyhow!("{e}"))??;
    }
    indices
        .iter()
        .map(|i| {
            ids.get(i)
                .copied()
                .ok_or_else(|| anyhow!("user {i} not verified"))
        })
        .collect()
}

/// A send as an end-to-end encrypting client makes it: no plaintext payload, one copy per device
/// of the receiver (the harness's receivers have one device each). The server cannot tell the
/// copy's bytes from ciphertext — it never reads them — so the harness sends its tagged bytes as
/// the copy; what it measures is the server's work, not the client's encryption.
fn encrypted_send(tag: Tag, to: [u8; 32], device: [u8; 16], copy: Bytes) -> frame::Send {
    frame::Send {
        id: tag.to_bytes().to_vec(),
        to_account: to.to_vec(),
        mode: SendMode::Queue as i32,
        ttl_seconds: 0,
        copies: vec![frame::Copy {
            device_id: device.to_vec(),
            payload: copy,
        }],
        receiver_contact_token: contact_token(device).to_vec(),
        ..Default::default()
    }
}

/// The contact token of a harness device, derived from its id: every sender holds its
/// receiver's, as people who write to each other do, so every send is a contact's.
fn contact_token(device: [u8; 16]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"tidings-bench contact token");
    hasher.update(device);
    hasher.finalize().into()
}

/// A logged-in session's two halves and the frame bytes already read.
pub struct Session {
    pub reader: ReadHalf<BoxIo>,
    pub writer: WriteHalf<BoxIo>,
    pub buf: BytesMut,
    /// The resumption token the login's answer carried (empty if none).
    pub resume_token: Vec<u8>,
}

/// The Olm keys user `index` publishes: an Ed25519 signing key, its Curve25519 form as the
/// identity key, and a fallback key signed as the protocol requires. Derived from the index, so
/// they are the same in every run. The harness's senders open no Olm sessions (the server never
/// reads a copy), so no one-time keys are published or claimed.
fn olm_keys(index: u32, device: [u8; 16]) -> frame::KeysUpload {
    use sha2::Digest as _;
    let derive = |label: &[u8]| {
        let mut hasher = sha2::Sha256::new();
        hasher.update(label);
        hasher.update(index.to_be_bytes());
        ed25519_dalek::SigningKey::from_bytes(&hasher.finalize().into())
    };
    let signing = derive(b"tidings-bench olm signing key\n");
    let fallback = derive(b"tidings-bench olm fallback key\n")
        .verifying_key()
        .to_montgomery()
        .to_bytes();
    let signature = signing.sign(&tidings_proto::transcript::one_time_key(
        &device, true, &fallback,
    ));
    frame::KeysUpload {
        request_id: 1,
        identity_key: signing.verifying_key().to_montgomery().to_bytes().to_vec(),
        signing_key: signing.verifying_key().to_bytes().to_vec(),
        one_time_keys: Vec::new(),
        fallback_key: Some(frame::SignedKey {
            public_key: fallback.to_vec(),
            signature: signature.to_bytes().to_vec(),
        }),
        // Every sender holds its receiver's contact token (`contact_token`): messages between
        // people who write to each other, which a server may push before storing them.
        contact_token_hash: {
            use sha2::Digest as _;
            sha2::Sha256::digest(contact_token(device)).to_vec()
        },
    }
}

/// Logs the new device in and publishes its keys.
async fn publish_keys(ctx: &Ctx, index: u32, device: [u8; 16]) -> anyhow::Result<()> {
    let mut session = login_as(ctx, index, device, false).await?;
    let upload: Frame = Kind::KeysUpload(olm_keys(index, device)).into();
    session
        .writer
        .write_all(&codec::encode_to_bytes(&upload))
        .await?;
    session.writer.flush().await?;
    tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            while let Some(frame) = codec::decode(&mut session.buf)? {
                match frame.kind {
                    Some(Kind::KeysUploadResult(_)) => return anyhow::Ok(()),
                    Some(Kind::Error(e)) => bail!("key upload for user {index}: {}", e.message),
                    _ => {}
                }
            }
            if session.reader.read_buf(&mut session.buf).await? == 0 {
                bail!("the server closed the session during the key upload");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("key upload for user {index} timed out"))??;
    let _ = session.writer.shutdown().await;
    Ok(())
}

/// Connects, upgrades and logs in user `index`.
pub async fn login(ctx: &Ctx, index: u32, listen: bool) -> anyhow::Result<Session> {
    login_as(ctx, index, device(ctx, index)?, listen).await
}

/// Connects, upgrades and logs in user `index` as device `device`.
async fn login_as(
    ctx: &Ctx,
    index: u32,
    device: [u8; 16],
    listen: bool,
) -> anyhow::Result<Session> {
    connect_as(ctx, index, device, listen, None).await
}

/// Connects and upgrades, presenting `resume` (a resumption token) if given: a token the server
/// takes logs the session in with the upgrade (no `Login`, no signature); without one, the
/// challenge is signed. A token refused is an error: the reconnect step measures resumptions.
async fn connect_as(
    ctx: &Ctx,
    index: u32,
    device: [u8; 16],
    listen: bool,
    resume: Option<&[u8]>,
) -> anyhow::Result<Session> {
    let mut io = open(ctx, Some(index)).await?;
    let resume_headers = match resume {
        Some(token) => format!(
            "{}: {}\r\n{}: {}\r\n",
            tidings_proto::RESUME_HEADER,
            tidings_proto::id::to_text(token),
            tidings_proto::LISTEN_HEADER,
            if listen { "1" } else { "0" }
        ),
        None => String::new(),
    };
    let request = format!(
        "GET /v1/connect HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\n{resume_headers}\r\n",
        ctx.endpoint.addr,
        tidings_proto::UPGRADE_PROTOCOL
    );
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;
    let (status, headers, mut buf) = tokio::time::timeout(LOGIN_TIMEOUT, read_head(&mut io))
        .await
        .map_err(|_| anyhow!("upgrade timed out"))??;
    if status != 101 {
        bail!("upgrade answered HTTP {status}");
    }
    let resumed = headers
        .get(tidings_proto::RESUMED_HEADER)
        .is_some_and(|v| v == "1");
    if resume.is_some() && !resumed {
        bail!("the server refused the resumption token");
    }
    if !resumed {
        let key = common::device_key(index);
        let challenge = headers
            .get(tidings_proto::CHALLENGE_HEADER)
            .and_then(|c| tidings_proto::id::from_text(c))
            .ok_or_else(|| anyhow!("no challenge in the upgrade"))?;
        let signature = key.sign(&tidings_proto::transcript::login(&challenge, &device));
        let login: Frame = Kind::Login(frame::Login {
            device_id: device.to_vec(),
            signature: signature.to_bytes().to_vec(),
            listen,
        })
        .into();
        io.write_all(&codec::encode_to_bytes(&login)).await?;
        io.flush().await?;
    }
    let answer = tokio::time::timeout(LOGIN_TIMEOUT, async {
        loop {
            if let Some(frame) = codec::decode(&mut buf)? {
                return anyhow::Ok(frame);
            }
            if io.read_buf(&mut buf).await? == 0 {
                bail!("the server closed the session during login");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("login timed out"))??;
    let resume_token = match answer.kind {
        Some(Kind::LoginResult(result)) => result.resume_token,
        Some(Kind::Error(e)) => bail!("login refused: {}", e.message),
        _ => bail!("login answered with an unexpected frame"),
    };
    // A listening bench device shows itself online to everyone, as every device did before
    // presence could be chosen, so that sends to it are answered and delivered as to a device
    // online. The answer is read, and ignored, with whatever comes next. A resumed session
    // sends nothing: the reconnect step measures the connect alone, as an MQTT reconnect to a
    // persistent session re-subscribes nothing.
    if listen && !resumed {
        let everyone: Frame = Kind::PresenceSet(frame::PresenceSet {
            request_id: u64::MAX,
            mode: frame::PresenceMode::Everyone as i32,
            key: vec![0; tidings_proto::PRESENCE_KEY_BYTES],
        })
        .into();
        io.write_all(&codec::encode_to_bytes(&everyone)).await?;
        io.flush().await?;
    }
    let (reader, writer) = tokio::io::split(io);
    Ok(Session {
        reader,
        writer,
        buf,
        resume_token,
    })
}

/// What a connection's writer task is asked to write.
enum Out {
    Frame(Frame),
    Send { tag: Tag },
}

/// Writes frames from the channel, coalescing what is queued, and pings when silent. Ends when
/// every sender of the channel is gone.
async fn writer_task(
    mut writer: WriteHalf<BoxIo>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    to: Option<([u8; 32], [u8; 16])>,
    stats: Option<Rc<StepStats>>,
) {
    let mut out = BytesMut::with_capacity(16 * 1024);
    let ping: Frame = Kind::Ping(frame::Ping { nonce: 0 }).into();
    let payload_for = |tag: Tag| Bytes::from(common::message_payload(tag));
    loop {
        let first = tokio::select! {
            message = rx.recv() => match message {
                Some(message) => message,
                None => break,
            },
            () = tokio::time::sleep(PING_EVERY) => Out::Frame(ping.clone()),
        };
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Out::Frame(frame) => codec::encode(&frame, &mut out),
                Out::Send { tag } => {
                    let (account, device) = to.unwrap_or_default();
                    let send: Frame =
                        Kind::Send(encrypted_send(tag, account, device, payload_for(tag))).into();
                    codec::encode(&send, &mut out);
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
        if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = writer.shutdown().await;
}

/// Reads frames until the connection ends, handing each to `handle`.
async fn read_frames(
    mut reader: ReadHalf<BoxIo>,
    mut buf: BytesMut,
    mut handle: impl FnMut(Kind) -> bool,
) -> anyhow::Result<()> {
    loop {
        while let Some(frame) = codec::decode(&mut buf)? {
            if let Some(kind) = frame.kind {
                if !handle(kind) {
                    return Ok(());
                }
            }
        }
        buf.reserve(16 * 1024);
        if reader.read_buf(&mut buf).await? == 0 {
            bail!("the server closed the session");
        }
    }
}

/// Logs in a listening user and keeps the session alive (pings, reads) until dropped; with the
/// resumption token its login's answer carried.
pub async fn hold(ctx: &Ctx, index: u32) -> anyhow::Result<(TaskGuard, Vec<u8>)> {
    let session = login(ctx, index, true).await?;
    Ok(keep(session))
}

/// Reconnects a listening user with the resumption token of its last login, and holds it like
/// [`hold`].
pub async fn resume(ctx: &Ctx, index: u32, token: &[u8]) -> anyhow::Result<(TaskGuard, Vec<u8>)> {
    let session = connect_as(ctx, index, device(ctx, index)?, true, Some(token)).await?;
    Ok(keep(session))
}

/// Keeps a session alive (pings, reads) until the guard is dropped.
fn keep(mut session: Session) -> (TaskGuard, Vec<u8>) {
    let token = std::mem::take(&mut session.resume_token);
    let (tx, rx) = mpsc::unbounded_channel::<Out>();
    let writer = spawn_guarded(writer_task(session.writer, rx, None, None));
    let reader = spawn_guarded(async move {
        let _ = read_frames(session.reader, session.buf, |_| true).await;
        drop(tx);
    });
    (TaskGuard::many(vec![writer, reader]), token)
}

/// Connects one relay pair: the sender (`2p`) and the receiver (`2p+1`), both listening.
pub async fn relay_pair(
    ctx: &Ctx,
    pair: u32,
    stats: Rc<StepStats>,
    window: Rc<Window>,
) -> anyhow::Result<PairLink> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let receiver = login(ctx, receiver_index, true).await?;
    let mut sender = login(ctx, sender_index, true).await?;
    let to = pseudonyms(ctx, &mut sender, &[common::number(receiver_index)], 1).await?[0];

    // Receiver: store nothing (a benchmark), acknowledge each delivery at once.
    let (rtx, rrx) = mpsc::unbounded_channel::<Out>();
    let receiver_writer = spawn_guarded(writer_task(receiver.writer, rrx, None, None));
    let receiver_stats = Rc::clone(&stats);
    let receiver_reader = spawn_guarded(async move {
        let result = read_frames(receiver.reader, receiver.buf, |kind| {
            match kind {
                Kind::Deliver(deliver) => {
                    if let Some((_, tag)) = common::parse_payload(&deliver.payload) {
                        receiver_stats.on_deliver(tag);
                    }
                    let ack = Kind::Ack(frame::Ack {
                        sender_device: deliver.sender_device,
                        id: deliver.id,
                        ..Default::default()
                    });
                    let _ = rtx.send(Out::Frame(ack.into()));
                }
                Kind::Receipt(receipt) => {
                    let ack = Kind::ReceiptAck(frame::ReceiptAck { id: receipt.id });
                    let _ = rtx.send(Out::Frame(ack.into()));
                }
                Kind::Error(e) if e.fatal => {
                    receiver_stats.error(format!("receiver: {}", e.message));
                    return false;
                }
                _ => {}
            }
            true
        })
        .await;
        if let Err(e) = result {
            receiver_stats.error(format!("receiver {receiver_index}: {e:#}"));
        }
    });

    // Sender: sends on the schedule; a refusal or a receipt frees its window slot.
    let (stx, srx) = mpsc::unbounded_channel::<Out>();
    let sender_writer = spawn_guarded(writer_task(
        sender.writer,
        srx,
        Some((to, device(ctx, receiver_index)?)),
        Some(Rc::clone(&stats)),
    ));
    let sender_stats = Rc::clone(&stats);
    let sender_window = Rc::clone(&window);
    let stx_reader = stx.clone();
    let sender_reader = spawn_guarded(async move {
        let result = read_frames(sender.reader, sender.buf, |kind| {
            match kind {
                Kind::SendResult(result) => {
                    let outcome =
                        SendOutcome::try_from(result.outcome).unwrap_or(SendOutcome::Invalid);
                    if !matches!(outcome, SendOutcome::Accepted | SendOutcome::Queued) {
                        if let Some(tag) = Tag::from_bytes(&result.id) {
                            if sender_stats.on_refused(tag, outcome == SendOutcome::RateLimited) {
                                sender_window.give();
                            }
                        }
                        if outcome != SendOutcome::RateLimited {
                            sender_stats.error(format!("send refused: {}", outcome.as_str()));
                        }
                    }
                }
                Kind::Receipt(receipt) => {
                    if let Some(tag) = Tag::from_bytes(&receipt.id) {
                        if sender_stats.on_receipt(tag) {
                            sender_window.give();
                        }
                    }
                    let ack = Kind::ReceiptAck(frame::ReceiptAck { id: receipt.id });
                    let _ = stx_reader.send(Out::Frame(ack.into()));
                }
                Kind::Deliver(deliver) => {
                    let ack = Kind::Ack(frame::Ack {
                        sender_device: deliver.sender_device,
                        id: deliver.id,
                        ..Default::default()
                    });
                    let _ = stx_reader.send(Out::Frame(ack.into()));
                }
                Kind::Error(e) if e.fatal => {
                    sender_stats.error(format!("sender: {}", e.message));
                    return false;
                }
                _ => {}
            }
            true
        })
        .await;
        if let Err(e) = result {
            sender_stats.error(format!("sender {sender_index}: {e:#}"));
        }
    });
    Ok(PairLink {
        send: Box::new(move |tag| stx.send(Out::Send { tag }).is_ok()),
        _guards: TaskGuard::many(vec![
            receiver_writer,
            receiver_reader,
            sender_writer,
            sender_reader,
        ]),
    })
}

/// Sends `per_pair` queued messages from the pair's sender to its (disconnected) receiver and
/// waits until the server answered every one. Returns how many were QUEUED (or ACCEPTED).
pub async fn store(ctx: &Ctx, pair: u32, per_pair: u32) -> anyhow::Result<u64> {
    let (sender_index, receiver_index) = (2 * pair, 2 * pair + 1);
    let mut session = login(ctx, sender_index, false).await?;
    let to = pseudonyms(ctx, &mut session, &[common::number(receiver_index)], 1).await?[0];
    let to_device = device(ctx, receiver_index)?;
    let mut out = BytesMut::new();
    for seq in 0..per_pair {
        let tag = Tag {
            step: 0,
            pair,
            seq,
            t_ns: 0,
        };
        let send: Frame = Kind::Send(encrypted_send(
            tag,
            to,
            to_device,
            Bytes::from(common::message_payload(tag)),
        ))
        .into();
        codec::encode(&send, &mut out);
    }
    session.writer.write_all(&out).await?;
    session.writer.flush().await?;
    let mut taken = 0u64;
    let mut answered = 0u32;
    let mut first_refusal = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while answered < per_pair {
        while let Some(frame) = codec::decode(&mut session.buf)? {
            match frame.kind {
                Some(Kind::SendResult(result)) => {
                    answered += 1;
                    match SendOutcome::try_from(result.outcome) {
                        Ok(SendOutcome::Queued | SendOutcome::Accepted) => taken += 1,
                        Ok(other) => {
                            first_refusal.get_or_insert(other.as_str());
                        }
                        Err(_) => {}
                    }
                }
                Some(Kind::Error(e)) if e.fatal => bail!("sender: {}", e.message),
                _ => {}
            }
        }
        if answered >= per_pair {
            break;
        }
        let read = tokio::time::timeout_at(deadline, session.reader.read_buf(&mut session.buf))
            .await
            .map_err(|_| anyhow!("store: no answer within 120 s"))??;
        if read == 0 {
            bail!("the server closed the sender's session");
        }
    }
    let _ = session.writer.shutdown().await;
    if let Some(refusal) = first_refusal {
        bail!(
            "{} of {per_pair} refused, e.g. {refusal}",
            u64::from(per_pair) - taken
        );
    }
    Ok(taken)
}

/// Logs the receiver back in and acknowledges every delivery until `per_pair` distinct messages
/// arrived; also waits for the server's confirmation of every acknowledgement.
pub async fn drain(
    ctx: &Ctx,
    pair: u32,
    per_pair: u32,
    clock: common::Clock,
    on_message: &dyn Fn(),
) -> anyhow::Result<DrainOutcome> {
    let receiver_index = 2 * pair + 1;
    let mut session = login(ctx, receiver_index, true).await?;
    let mut seen = vec![false; per_pair as usize];
    let mut outcome = DrainOutcome::default();
    let mut confirmed = 0u32;
    let mut out = BytesMut::new();
    loop {
        while let Some(frame) = codec::decode(&mut session.buf)? {
            match frame.kind {
                Some(Kind::Deliver(deliver)) => {
                    if let Some((_, tag)) = common::parse_payload(&deliver.payload) {
                        match seen.get_mut(tag.seq as usize) {
                            Some(slot) if !*slot => {
                                *slot = true;
                                outcome.received += 1;
                                on_message();
                            }
                            _ => outcome.duplicates += 1,
                        }
                    }
                    codec::encode(
                        &Kind::Ack(frame::Ack {
                            sender_device: deliver.sender_device,
                            id: deliver.id,
                            ..Default::default()
                        })
                        .into(),
                        &mut out,
                    );
                }
                Some(Kind::AckResult(_)) => {
                    confirmed += 1;
                    if confirmed >= per_pair {
                        outcome.confirmed_ns = Some(clock.ns());
                    }
                }
                Some(Kind::Error(e)) if e.fatal => bail!("receiver: {}", e.message),
                _ => {}
            }
        }
        if !out.is_empty() {
            session.writer.write_all(&out).await?;
            session.writer.flush().await?;
            out.clear();
            if outcome.received >= u64::from(per_pair) && outcome.done_ns == 0 {
                outcome.done_ns = clock.ns();
            }
        }
        if outcome.done_ns != 0 && outcome.confirmed_ns.is_some() {
            break;
        }
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            session.reader.read_buf(&mut session.buf),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "receiver {receiver_index}: nothing for 30 s after {} of {per_pair}",
                outcome.received
            )
        })??;
        if read == 0 {
            bail!("the server closed the receiver's session");
        }
    }
    let _ = session.writer.shutdown().await;
    Ok(outcome)
}

/// Looks up the phonebook over and over until `until`, as a client that knows none of its
/// numbers yet: blind every number, one `Evaluate`, check the proof and unblind, then one `Lookup`
/// by pseudonym. Returns (phonebooks resolved, numbers answered, wall-time histogram per
/// phonebook).
pub async fn lookup_loop(
    ctx: &Ctx,
    client: u32,
    phonebook: &[String],
    until: Instant,
) -> anyhow::Result<(u64, u64, hdrhistogram::Histogram<u64>)> {
    let mut session = login(ctx, client, true).await?;
    let mut hist = common::histogram();
    let (mut requests, mut numbers) = (0u64, 0u64);
    let mut request_id = 0u64;
    while Instant::now() < until {
        let started = Instant::now();
        let accounts = pseudonyms(ctx, &mut session, phonebook, request_id + 1).await?;
        request_id += 2;
        let lookup: Frame = Kind::Lookup(frame::Lookup {
            request_id,
            accounts: accounts.iter().map(|a| a.to_vec()).collect(),
            ..frame::Lookup::default()
        })
        .into();
        session
            .writer
            .write_all(&codec::encode_to_bytes(&lookup))
            .await?;
        session.writer.flush().await?;
        let answer = answer_to(&mut session, request_id, "lookup").await?;
        let Kind::LookupResult(result) = answer else {
            bail!("lookup: unexpected answer");
        };
        let answered = result.entries.len() as u64;
        common::record_ns(
            &mut hist,
            u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        );
        requests += 1;
        numbers += answered;
    }
    let _ = session.writer.shutdown().await;
    Ok((requests, numbers, hist))
}

/// Waits (30 s at most) for the frame answering `request_id`; an error frame is an error.
async fn answer_to(session: &mut Session, request_id: u64, what: &str) -> anyhow::Result<Kind> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            while let Some(frame) = codec::decode(&mut session.buf)? {
                match frame.kind {
                    Some(Kind::Error(e)) if e.request_id == request_id || e.fatal => {
                        bail!("{what} refused: {}", e.message)
                    }
                    Some(kind) if kind.answer_to() == Some(request_id) => return Ok(kind),
                    _ => {}
                }
            }
            if session.reader.read_buf(&mut session.buf).await? == 0 {
                bail!("the server closed the session");
            }
        }
    })
    .await
    .map_err(|_| anyhow!("{what}: no answer within 30 s"))?
}

thread_local! {
    /// The servers' OPRF public keys, by address: fetched once per worker.
    static OPRF_KEYS: std::cell::RefCell<HashMap<std::net::SocketAddr, [u8; 32]>> =
        std::cell::RefCell::new(HashMap::new());
}

/// The server's OPRF public key (`GET /v1/oprf-key`), as a client pins it.
async fn oprf_key(ctx: &Ctx) -> anyhow::Result<[u8; 32]> {
    let addr = ctx.endpoint.addr;
    if let Some(key) = OPRF_KEYS.with(|keys| keys.borrow().get(&addr).copied()) {
        return Ok(key);
    }
    let mut io = open(ctx, None).await?;
    let (status, body) = http_json(&mut io, "GET", &addr.to_string(), "/v1/oprf-key", "").await?;
    let key = body["public_key"]
        .as_str()
        .and_then(tidings_proto::id::from_text)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| anyhow!("GET /v1/oprf-key: HTTP {status} {body}"))?;
    OPRF_KEYS.with(|keys| keys.borrow_mut().insert(addr, key));
    Ok(key)
}

/// The pseudonyms of `numbers` as a client derives them: blinded, evaluated in one `Evaluate`
/// (`request_id`), the batch proof checked against the server's key, unblinded.
pub async fn pseudonyms(
    ctx: &Ctx,
    session: &mut Session,
    numbers: &[String],
    request_id: u64,
) -> anyhow::Result<Vec<[u8; 32]>> {
    use voprf::{EvaluationElement, Group as _, Proof, Ristretto255, VoprfClient};
    let public = Ristretto255::deserialize_elem(&oprf_key(ctx).await?)
        .map_err(|_| anyhow!("the server's OPRF key is not a point"))?;
    let mut rng = rand::rngs::OsRng;
    let blinds = numbers
        .iter()
        .map(|n| VoprfClient::<Ristretto255>::blind(n.as_bytes(), &mut rng))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("blind: {e:?}"))?;
    let evaluate: Frame = Kind::Evaluate(frame::Evaluate {
        request_id,
        blinded: blinds
            .iter()
            .map(|b| b.message.serialize().to_vec())
            .collect(),
        ..frame::Evaluate::default()
    })
    .into();
    session
        .writer
        .write_all(&codec::encode_to_bytes(&evaluate))
        .await?;
    session.writer.flush().await?;
    let Kind::EvaluateResult(result) = answer_to(session, request_id, "evaluate").await? else {
        bail!("evaluate: unexpected answer");
    };
    let messages = result
        .evaluated
        .iter()
        .map(|e| EvaluationElement::<Ristretto255>::deserialize(e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("evaluated element: {e:?}"))?;
    let proof =
        Proof::<Ristretto255>::deserialize(&result.proof).map_err(|e| anyhow!("proof: {e:?}"))?;
    let clients: Vec<_> = blinds.into_iter().map(|b| b.state).collect();
    let inputs: Vec<&[u8]> = numbers.iter().map(|n| n.as_bytes()).collect();
    VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, public)
        .map_err(|e| anyhow!("the proof does not verify: {e:?}"))?
        .map(|output| {
            let output = output.map_err(|e| anyhow!("finalize: {e:?}"))?;
            let mut pseudonym = [0u8; 32];
            pseudonym.copy_from_slice(&output[..32]);
            Ok(pseudonym)
        })
        .collect()
}
