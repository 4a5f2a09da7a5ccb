//! Nodes over one database and one NATS (the `bus` setting): what one node cannot do alone.
//!
//! Each node has an id drawn at random when its process starts, and these subjects under the
//! `bus_prefix` (docs/PROTOCOL.md lists every message):
//! - `{prefix}.dir`: which node serves which device. Every node keeps the map of the others in
//!   memory only, from what each announces: a device's first session on the node, its last
//!   session gone, a beat every [`BEAT`], and its whole list when a node (re)joins. A node not
//!   heard for [`SILENT`] is dropped with its devices, so a node killed with `kill -9` leaves no
//!   trace anywhere. Nothing of it is ever written to disk (P6): no stream, no bucket.
//! - `{prefix}.node.{id}`: the node's inbox. A stored copy or a receipt for a device served by
//!   another node goes there, and so does a presence question: the device's presence setting
//!   (its mode and key) stays on the node that serves it, which answers yes or no.
//! - `{prefix}.all`: sign-outs, to every node (a directory entry may be stale).
//! - `{prefix}.links`: a link code, to whichever node holds its offer.
//! - `{prefix}.strangers`: which stored messages are strangers', to every node (never written).
//!
//! What a node answers and does with what it hears is in `answers`.
//!
//! Core NATS delivers at most once: a copy or a receipt published while the bus is down, or
//! lost, is still stored, and a session reads its queue again when the bus comes back and a
//! beat after its device was announced (so that a copy stored by a node that did not know yet
//! where the device was is not left waiting). A lost sign-out is why every privileged request
//! checks its device in the database, and why a node whose bus is down checks every device it
//! serves against the database each [`BEAT`]. Copies that wait are stored in the database every
//! node shares; held copies (deliver first) never leave their node: a message whose devices are
//! not all served here is stored before it is pushed.
//!
//! Nothing here carries a number or a message's text: device ids, sealed frames, and presence
//! proofs (MACs that name no one) only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt as _;
use prost::Message as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use tidings_core::presence::Secret;
use tidings_core::Millis;
use tidings_proto::frame::Frame;
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::{AccountId, AckKind, Acked, Store, StoreError};
use tokio::sync::mpsc;

use crate::budget::Budget;
use crate::clock::now_ms;
use crate::hub::Hub;
use crate::keys::BudgetKey;
use crate::state::{LinkOffer, Shared};

mod answers;

pub use answers::{all_listening, count_visible, share_new_strangers, visible};
use answers::{check_devices, inbox_message, link_question, signed_out, strangers_elsewhere};

/// How often a node says it is alive, and checks its devices while its bus is down.
pub const BEAT: Duration = Duration::from_secs(1);
/// A node not heard for this long is gone: its devices are offline everywhere.
pub const SILENT: Millis = 5_000;
/// How long a presence question waits for the node that serves the device.
const QUESTION_TIMEOUT: Duration = Duration::from_millis(500);
/// Messages waiting to be published, at most (directory changes, copies, receipts).
const OUTGOING: usize = 65_536;
/// Devices per directory message (16 bytes each: 64 KiB, under NATS's 1 MiB default).
const DEVICES_PER_MESSAGE: usize = 4_096;

/// Why a session was signed out, as sign-outs carry it between nodes (an index, not text).
const SIGN_OUT_REASONS: [&str; 4] = [
    "this device was signed out",
    "this device was removed from its number",
    "the account was disabled",
    "this number was registered on another device",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum DirKind {
    Add = 1,
    Remove = 2,
    Beat = 3,
    /// The first part of a node's whole list: replaces what was known of it.
    ListFirst = 4,
    ListMore = 5,
    /// Asks every node for its whole list (a node that joined or came back).
    Ask = 6,
    Bye = 7,
}

impl DirKind {
    fn parse(byte: u8) -> Option<Self> {
        [
            Self::Add,
            Self::Remove,
            Self::Beat,
            Self::ListFirst,
            Self::ListMore,
            Self::Ask,
            Self::Bye,
        ]
        .into_iter()
        .find(|kind| *kind as u8 == byte)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum InboxKind {
    /// A stored copy for the device's listening sessions.
    Deliver = 1,
    /// A frame for every session of the device (a receipt, a link's completion).
    Notify = 2,
    /// Whether the device shows itself online to an asker: answered `[1]` or `[0]`.
    Presence = 3,
    /// A charge to an account's budget at its owner ([`crate::budget`]): answered `[0]`, or
    /// `[1]` and the wait.
    Budget = 4,
    /// A held copy (deliver first) for the device's listening sessions; its acknowledgement
    /// goes back to the node that holds it.
    HeldDeliver = 5,
    /// A device's acknowledgement of a copy this node holds: decided here, answered with what it
    /// came to ([`HeldAnswer`]).
    HeldAck = 6,
    /// A question for the registration limits this node keeps as the abuse owner
    /// ([`crate::abuse::Question`]), answered as [`crate::abuse::answer_to_bytes`] says.
    Abuse = 7,
    /// A question about a declaration this node keeps as its number's owner
    /// ([`crate::inbound::Question`]), answered as [`crate::inbound::Answer`].
    Declaration = 8,
}

/// What an owner node is asked about ([`Bus::ask_owner`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asking {
    /// An account's budget ([`crate::budget`]).
    Budget,
    /// The registration limits and SMS budgets ([`crate::abuse`]).
    Abuse,
    /// A number's declaration ([`crate::inbound`]).
    Declaration,
}

/// What deciding an acknowledgement of a held copy came to, as the holding node answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum HeldAnswer {
    NotHeld = 0,
    Unknown = 1,
    Confirmed = 2,
    ConfirmedFirst = 3,
    Withdrawn = 4,
    Failed = 5,
}

impl HeldAnswer {
    fn of(acked: Option<&tidings_store::Result<Acked>>) -> Self {
        match acked {
            None => Self::NotHeld,
            Some(Ok(Acked::Unknown)) => Self::Unknown,
            Some(Ok(Acked::Confirmed { first: false })) => Self::Confirmed,
            Some(Ok(Acked::Confirmed { first: true })) => Self::ConfirmedFirst,
            Some(Ok(Acked::Withdrawn)) => Self::Withdrawn,
            Some(Err(_)) => Self::Failed,
        }
    }

    fn acked(byte: u8) -> Option<tidings_store::Result<Acked>> {
        Some(match byte {
            1 => Ok(Acked::Unknown),
            2 => Ok(Acked::Confirmed { first: false }),
            3 => Ok(Acked::Confirmed { first: true }),
            4 => Ok(Acked::Withdrawn),
            5 => Err(StoreError::Engine(
                "the node holding the copy could not decide its acknowledgement".into(),
            )),
            _ => return None,
        })
    }
}

fn ack_kind_byte(kind: AckKind) -> u8 {
    match kind {
        AckKind::Shown => 1,
        AckKind::ShownWithoutReceipt => 2,
        AckKind::Discarded => 3,
    }
}

fn ack_kind(byte: u8) -> Option<AckKind> {
    [
        AckKind::Shown,
        AckKind::ShownWithoutReceipt,
        AckKind::Discarded,
    ]
    .into_iter()
    .find(|kind| ack_kind_byte(*kind) == byte)
}

/// Most devices of other nodes the directory keeps (a bound, far above what a deployment
/// serves: 16 bytes and a node id each, about 70 bytes with the map's overhead).
const DIRECTORY_DEVICES: usize = 4_000_000;
/// Most other nodes the directory keeps.
const DIRECTORY_NODES: usize = 1_024;

/// Strangers' positions one message carries at most.
const STRANGERS_PER_MESSAGE: usize = 4_096;
/// Most held copies of other nodes this node tracks for their acknowledgements.
const HELD_HERE: usize = 1_000_000;
/// How long this node remembers which node holds a copy it was handed.
const HELD_HERE_FOR: Millis = 60_000;

/// What is published, in the order it was handed over.
#[derive(Debug)]
enum Outgoing {
    Directory(DirKind, Vec<DeviceId>),
    Inbox(u64, Bytes),
    SignOut(u8, Vec<DeviceId>),
    /// Queue positions of strangers' messages this node's store stored, with their receivers.
    Strangers(Vec<(i64, AccountId)>),
}

/// The other nodes' devices, in memory only.
#[derive(Debug, Default)]
struct Directory {
    devices: HashMap<DeviceId, u64>,
    /// When each node was last heard (wall clock, ms).
    nodes: HashMap<u64, Millis>,
}

impl Directory {
    fn forget_node(&mut self, node: u64) {
        self.nodes.remove(&node);
        self.devices.retain(|_, serving| *serving != node);
    }
}

/// This node's link to the others.
#[derive(Debug)]
pub struct Bus {
    client: async_nats::Client,
    node: u64,
    prefix: String,
    directory: Mutex<Directory>,
    outgoing: mpsc::Sender<Outgoing>,
    /// Connected to NATS (kept by the connection's event callback).
    up: Arc<AtomicBool>,
    /// An announcement could not be queued: the whole list goes out at the next beat.
    dirty: AtomicBool,
    /// The receiving end of `outgoing`, taken by [`run`].
    pending: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Told of each reconnection.
    reconnected: Arc<tokio::sync::Notify>,
    /// Held copies other nodes pushed here, by message: the node that holds each and when this
    /// entry lapses. Ids only.
    held_here: Mutex<HashMap<(DeviceId, MessageId), (u64, Millis)>>,
}

impl Bus {
    /// Connects to NATS at `url`, or at the first of several comma-separated URLs that answers
    /// (retrying in the background if none is up yet).
    pub async fn connect(url: &str, prefix: &str, node_name: &str) -> anyhow::Result<Arc<Self>> {
        let node = rand::rngs::OsRng.next_u64();
        let up = Arc::new(AtomicBool::new(false));
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let (events_up, events_reconnected) = (Arc::clone(&up), Arc::clone(&reconnected));
        let addresses = url
            .split(',')
            .map(|one| one.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("the bus URL {} is not valid: {e}", redact(url)))?;
        let mut options = async_nats::ConnectOptions::new();
        // A user and password in a URL are the bus's credentials (the client would not send them
        // by itself).
        if let Some(address) = addresses.iter().find(|address| address.has_user_pass()) {
            options = options.user_and_password(
                address.username().unwrap_or_default().to_string(),
                address.password().unwrap_or_default().to_string(),
            );
        }
        let client = options
            // A node never hears its own messages: a copy it publishes is for another node.
            .no_echo()
            .name(format!("tidings {node_name}"))
            .retry_on_initial_connect()
            .request_timeout(Some(QUESTION_TIMEOUT))
            .event_callback(move |event| {
                let (up, reconnected) = (Arc::clone(&events_up), Arc::clone(&events_reconnected));
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("the bus is connected");
                            up.store(true, Ordering::Release);
                            reconnected.notify_one();
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("the bus is disconnected: copies for devices on other nodes are stored until it is back");
                            up.store(false, Ordering::Release);
                        }
                        other => tracing::debug!(event = %other, "bus event"),
                    }
                }
            })
            .connect(addresses)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to the bus at {}: {e}", redact(url)))?;
        let (outgoing, pending) = mpsc::channel(OUTGOING);
        Ok(Arc::new(Self {
            client,
            node,
            prefix: prefix.to_string(),
            directory: Mutex::default(),
            outgoing,
            up,
            dirty: AtomicBool::new(false),
            pending: Mutex::new(Some(pending)),
            reconnected,
            held_here: Mutex::default(),
        }))
    }

    /// Whether the bus is connected now.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn subject_dir(&self) -> String {
        format!("{}.dir", self.prefix)
    }

    fn subject_all(&self) -> String {
        format!("{}.all", self.prefix)
    }

    fn subject_strangers(&self) -> String {
        format!("{}.strangers", self.prefix)
    }

    fn subject_links(&self) -> String {
        format!("{}.links", self.prefix)
    }

    fn subject_node(&self, node: u64) -> String {
        format!("{}.node.{node:016x}", self.prefix)
    }

    fn queue(&self, message: Outgoing) -> bool {
        self.outgoing.try_send(message).is_ok()
    }

    /// Tells every other node's store of strangers' messages this node's store stored (who is a
    /// stranger is never written, so each node counts the stranger pools from what it is told).
    pub fn share_strangers(&self, positions: Vec<(i64, AccountId)>) {
        for chunk in positions.chunks(STRANGERS_PER_MESSAGE) {
            if !self.queue(Outgoing::Strangers(chunk.to_vec())) {
                tracing::debug!("strangers' positions could not be handed to the bus");
            }
        }
    }

    /// A device's first session on this node registered (`true`) or its last one ended.
    pub fn announce(&self, device: DeviceId, here: bool) {
        let kind = if here { DirKind::Add } else { DirKind::Remove };
        if !self.queue(Outgoing::Directory(kind, vec![device])) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// The node that serves `device`, if another one does.
    pub fn node_of(&self, device: &DeviceId) -> Option<u64> {
        self.directory().devices.get(device).copied()
    }

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a frame to the node that serves `device`, if another one does: a stored copy
    /// (`deliver`) or a frame for every session. Whether it went out.
    pub fn forward(&self, device: &DeviceId, frame: &Frame, deliver: bool) -> bool {
        let Some(node) = self.node_of(device) else {
            return false;
        };
        let kind = if deliver {
            InboxKind::Deliver
        } else {
            InboxKind::Notify
        };
        let mut body = BytesMut::with_capacity(17 + frame.encoded_len());
        body.put_u8(kind as u8);
        body.put_slice(&device.0);
        frame.encode(&mut body).ok();
        self.queue(Outgoing::Inbox(node, body.freeze()))
    }

    /// Hands a held copy to the node that serves `device`, if another one does; whether it went.
    pub fn forward_held(&self, device: &DeviceId, frame: &Frame) -> bool {
        let Some(node) = self.node_of(device) else {
            return false;
        };
        let mut body = BytesMut::with_capacity(25 + frame.encoded_len());
        body.put_u8(InboxKind::HeldDeliver as u8);
        body.put_slice(&device.0);
        body.put_u64(self.node);
        frame.encode(&mut body).ok();
        self.queue(Outgoing::Inbox(node, body.freeze()))
    }

    /// Asks the node that pushed a held copy of this message here to decide `device`'s
    /// acknowledgement of it; `None` when no node holds it (or none answered): it is then a
    /// stored copy, if any.
    pub async fn ack_held_elsewhere(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Option<tidings_store::Result<Acked>> {
        let (origin, _) = self
            .held_here
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(sender_device, id))?;
        let mut body = BytesMut::with_capacity(50);
        body.put_u8(InboxKind::HeldAck as u8);
        body.put_slice(&device.0);
        body.put_slice(&sender_device.0);
        body.put_slice(id.as_bytes());
        body.put_u8(ack_kind_byte(kind));
        match self
            .client
            .request(self.subject_node(origin), body.freeze())
            .await
        {
            Ok(answer) => HeldAnswer::acked(*answer.payload.first()?),
            Err(e) => {
                tracing::debug!(error = %e, "the node holding a copy did not answer its acknowledgement");
                None
            }
        }
    }

    /// Notes that the node `origin` holds the copy `frame` (a `Deliver`) pushed here.
    fn note_held(&self, origin: u64, frame: &Frame, now: Millis) {
        let Some(tidings_proto::frame::Kind::Deliver(deliver)) = &frame.kind else {
            return;
        };
        let (Some(sender), Some(id)) = (
            DeviceId::from_slice(&deliver.sender_device),
            MessageId::from_slice(&deliver.id),
        ) else {
            return;
        };
        let mut held = self
            .held_here
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if held.len() < HELD_HERE {
            held.insert((sender, id), (origin, now + HELD_HERE_FOR));
        }
    }

    /// Forgets the held copies of other nodes that lapsed.
    fn forget_lapsed_held(&self, now: Millis) {
        self.held_here
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (_, lapses)| *lapses > now);
    }

    /// Signs these devices out on every other node.
    pub fn sign_out(&self, devices: &[DeviceId], reason: &str) {
        let index = SIGN_OUT_REASONS
            .iter()
            .position(|known| *known == reason)
            .unwrap_or(0);
        for chunk in devices.chunks(DEVICES_PER_MESSAGE) {
            let index = u8::try_from(index).unwrap_or(0);
            if !self.queue(Outgoing::SignOut(index, chunk.to_vec())) {
                tracing::warn!("a sign-out could not be handed to the bus; the devices' nodes find it in the database");
            }
        }
    }

    /// Whether `device`, served by another node, shows itself online to `asker` (with `proof`,
    /// the asker's MAC for it, if any). No answer in time counts as offline.
    pub async fn shows_online(
        &self,
        device: DeviceId,
        asker: DeviceId,
        proof: Option<&Secret>,
        now: Millis,
    ) -> bool {
        let Some(node) = self.node_of(&device) else {
            return false;
        };
        let mut body = BytesMut::with_capacity(17 + 16 + 33 + 8);
        body.put_u8(InboxKind::Presence as u8);
        body.put_slice(&device.0);
        body.put_slice(&asker.0);
        match proof {
            Some(mac) => {
                body.put_u8(1);
                body.put_slice(mac);
            }
            None => body.put_u8(0),
        }
        body.put_u64(now);
        match self
            .client
            .request(self.subject_node(node), body.freeze())
            .await
        {
            Ok(answer) => answer.payload.first() == Some(&1),
            Err(e) => {
                tracing::debug!(error = %e, "a presence question went unanswered");
                false
            }
        }
    }

    async fn publish(&self, message: Outgoing) {
        let (subject, body) = match message {
            Outgoing::Directory(kind, devices) => {
                (self.subject_dir(), self.dir_message(kind, &devices))
            }
            Outgoing::Inbox(node, body) => (self.subject_node(node), body),
            Outgoing::SignOut(reason, devices) => {
                let mut body = BytesMut::with_capacity(1 + 16 * devices.len());
                body.put_u8(reason);
                for device in &devices {
                    body.put_slice(&device.0);
                }
                (self.subject_all(), body.freeze())
            }
            Outgoing::Strangers(positions) => {
                let mut body = BytesMut::with_capacity(8 + 16 * positions.len());
                body.put_u64(self.node);
                for (position, receiver) in &positions {
                    body.put_i64(*position);
                    body.put_i64(receiver.0);
                }
                (self.subject_strangers(), body.freeze())
            }
        };
        if let Err(e) = self.client.publish(subject, body).await {
            tracing::debug!(error = %e, "a bus message was not published");
        }
    }

    fn dir_message(&self, kind: DirKind, devices: &[DeviceId]) -> Bytes {
        let mut body = BytesMut::with_capacity(9 + 16 * devices.len());
        body.put_u8(kind as u8);
        body.put_u64(self.node);
        for device in devices {
            body.put_slice(&device.0);
        }
        body.freeze()
    }

    /// Publishes this node's whole list of devices (in parts).
    async fn publish_list(&self, hub: &Hub) {
        self.dirty.store(false, Ordering::Release);
        let devices = hub.devices();
        let mut parts = devices.chunks(DEVICES_PER_MESSAGE);
        let first = parts.next().unwrap_or(&[]);
        self.publish(Outgoing::Directory(DirKind::ListFirst, first.to_vec()))
            .await;
        for part in parts {
            self.publish(Outgoing::Directory(DirKind::ListMore, part.to_vec()))
                .await;
        }
    }

    /// Takes in another node's directory message.
    fn heard_directory(&self, body: &[u8], now: Millis) -> Option<DirKind> {
        let (&kind, rest) = body.split_first()?;
        let kind = DirKind::parse(kind)?;
        let node = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        if node == self.node {
            return None;
        }
        let devices = rest[8..]
            .chunks_exact(16)
            .filter_map(DeviceId::from_slice)
            .collect::<Vec<_>>();
        let mut directory = self.directory();
        if kind == DirKind::Bye {
            directory.forget_node(node);
            return Some(kind);
        }
        if directory.nodes.len() >= DIRECTORY_NODES && !directory.nodes.contains_key(&node) {
            tracing::warn!("more nodes on the bus than a directory keeps: one is ignored");
            return None;
        }
        directory.nodes.insert(node, now);
        if matches!(kind, DirKind::Add | DirKind::ListFirst | DirKind::ListMore)
            && directory.devices.len() + devices.len() > DIRECTORY_DEVICES
        {
            tracing::warn!(
                "the directory of other nodes' devices is full: an announcement is ignored"
            );
            return Some(kind);
        }
        match kind {
            DirKind::Add | DirKind::ListMore => {
                for device in devices {
                    directory.devices.insert(device, node);
                }
            }
            DirKind::ListFirst => {
                directory.devices.retain(|_, serving| *serving != node);
                for device in devices {
                    directory.devices.insert(device, node);
                }
            }
            DirKind::Remove => {
                for device in devices {
                    if directory.devices.get(&device) == Some(&node) {
                        directory.devices.remove(&device);
                    }
                }
            }
            DirKind::Beat | DirKind::Ask | DirKind::Bye => {}
        }
        Some(kind)
    }

    /// Drops the nodes not heard for [`SILENT`]; how many there were.
    fn forget_silent(&self, now: Millis) -> usize {
        let mut directory = self.directory();
        let silent: Vec<u64> = directory
            .nodes
            .iter()
            .filter(|(_, heard)| now.saturating_sub(**heard) > SILENT)
            .map(|(node, _)| *node)
            .collect();
        for node in &silent {
            directory.forget_node(*node);
        }
        silent.len()
    }

    /// Takes the link offer with this code hash from the node that holds it, if another one
    /// does and it is `account`'s and live at `now` (single use: the holder removes it).
    pub async fn take_link_offer(
        &self,
        hash: [u8; 32],
        account: AccountId,
        now: Millis,
    ) -> Option<LinkOffer> {
        let mut body = BytesMut::with_capacity(48);
        body.put_slice(&hash);
        body.put_i64(account.0);
        body.put_u64(now);
        let answer = self
            .client
            .request(self.subject_links(), body.freeze())
            .await
            .ok()?;
        let approver = answer.payload.get(..16).and_then(DeviceId::from_slice)?;
        let expires_at = u64::from_be_bytes(answer.payload.get(16..24)?.try_into().ok()?);
        Some(LinkOffer {
            account,
            approver,
            expires_at,
        })
    }

    /// The node that keeps the budgets of the account with `key`, if another one does: the
    /// first by rendezvous hashing among the nodes heard from and this one. None while the bus
    /// is down: this node then charges its own copy.
    pub fn owner(&self, key: &BudgetKey) -> Option<u64> {
        self.owner_of(&key.to_bytes())
    }

    /// The node that keeps the registration limits and SMS budgets ([`crate::abuse`]), if
    /// another one does; none while the bus is down.
    pub fn abuse_owner(&self) -> Option<u64> {
        self.owner_of(b"tidings registration limits")
    }

    /// The node that keeps the declaration (registration by own SMS) of the number with this
    /// pseudonym ([`crate::inbound`]), if another one does; none while the bus is down.
    pub fn declaration_owner(&self, pseudonym: &tidings_store::Pseudonym) -> Option<u64> {
        self.owner_of(&[&b"tidings declaration "[..], &pseudonym.0].concat())
    }

    /// Asks `owner` a question of what it keeps as an owner; its answer, or `None` when it did
    /// not answer in time.
    pub async fn ask_owner(&self, owner: u64, asking: Asking, question: Vec<u8>) -> Option<Bytes> {
        let mut body = Vec::with_capacity(1 + question.len());
        body.push(match asking {
            Asking::Budget => InboxKind::Budget,
            Asking::Abuse => InboxKind::Abuse,
            Asking::Declaration => InboxKind::Declaration,
        } as u8);
        body.extend_from_slice(&question);
        match self
            .client
            .request(self.subject_node(owner), body.into())
            .await
        {
            Ok(answer) => Some(answer.payload),
            Err(e) => {
                tracing::debug!(error = %e, "an owner did not answer: answered here");
                None
            }
        }
    }

    /// Whether this node runs the periodic job `job` over the shared store (expiry, pruning,
    /// scrubbing): the first node for it by rendezvous hashing, or every node while the bus is
    /// down (each run is a transaction of its own, so two nodes at once only repeat work).
    pub fn runs_job(&self, job: &str) -> bool {
        self.owner_of(job.as_bytes()).is_none()
    }

    /// The first node for `key` by rendezvous hashing, if another one than this; none while the
    /// bus is down.
    fn owner_of(&self, key: &[u8]) -> Option<u64> {
        if !self.is_up() {
            return None;
        }
        let rank = |node: u64| -> [u8; 32] {
            let mut hash = Sha256::new();
            hash.update(key);
            hash.update(node.to_be_bytes());
            hash.finalize().into()
        };
        let directory = self.directory();
        let owner = directory
            .nodes
            .keys()
            .copied()
            .chain(std::iter::once(self.node))
            .max_by_key(|node| rank(*node))?;
        (owner != self.node).then_some(owner)
    }

    /// Asks `owner` to take `units` from an account's `budget`; `None` when it did not answer
    /// in time.
    pub async fn ask_budget(
        &self,
        owner: u64,
        budget: Budget,
        key: BudgetKey,
        units: u32,
        more: u32,
        now: Millis,
    ) -> Option<Result<u32, Millis>> {
        let mut body = Vec::with_capacity(1 + 32 + 4 + 8 + 4);
        body.put_u8(budget.to_byte());
        body.put_slice(&key.to_bytes());
        body.put_u32(units);
        body.put_u64(now);
        body.put_u32(more);
        let answer = self.ask_owner(owner, Asking::Budget, body).await?;
        match answer.split_first() {
            Some((0, granted)) => Some(Ok(granted
                .get(..4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map_or(0, u32::from_be_bytes))),
            Some((1, wait)) => Some(Err(u64::from_be_bytes(wait.get(..8)?.try_into().ok()?))),
            _ => None,
        }
    }

    /// Nodes heard from, this one excluded.
    pub fn other_nodes(&self) -> usize {
        self.directory().nodes.len()
    }
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_string(),
    }
}

/// Runs the bus for this node until shutdown: publishes what is handed over, takes in the
/// other nodes' messages, beats, and checks its devices while the bus is down.
pub async fn run<S: Store>(state: Shared<S>, bus: Arc<Bus>) {
    let subscribed = async {
        let dir = bus.client.subscribe(bus.subject_dir()).await?;
        let all = bus.client.subscribe(bus.subject_all()).await?;
        let inbox = bus.client.subscribe(bus.subject_node(bus.node)).await?;
        let links = bus.client.subscribe(bus.subject_links()).await?;
        let strangers = bus.client.subscribe(bus.subject_strangers()).await?;
        Ok::<_, async_nats::SubscribeError>((dir, all, inbox, links, strangers))
    };
    let (mut dir, mut all, mut inbox, mut links, mut strangers) = match subscribed.await {
        Ok(subscribers) => subscribers,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to the bus: this node serves only its own sessions");
            return;
        }
    };
    let Some(mut pending) = bus
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    else {
        return;
    };
    let hub = Arc::clone(&state.hub);
    bus.publish(Outgoing::Directory(DirKind::Ask, Vec::new()))
        .await;
    bus.publish_list(&hub).await;
    let mut beat = tokio::time::interval(BEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Sessions registered from this number on were announced in the current beat.
    let mut announced_from = hub.next_session();
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => break,
            Some(message) = pending.recv() => bus.publish(message).await,
            Some(message) = dir.next() => {
                if bus.heard_directory(&message.payload, now_ms()) == Some(DirKind::Ask) {
                    bus.publish_list(&hub).await;
                }
            }
            Some(message) = all.next() => signed_out(&state, &message.payload),
            Some(message) = inbox.next() => inbox_message(&state, &bus, message).await,
            Some(message) = links.next() => link_question(&state, &bus, message).await,
            Some(message) = strangers.next() => strangers_elsewhere(&state, &bus, &message.payload),
            () = bus.reconnected.notified() => {
                // Whatever was published while the bus was down may be lost: every list is
                // asked for again, and every session reads its queue again.
                bus.publish(Outgoing::Directory(DirKind::Ask, Vec::new())).await;
                bus.publish_list(&hub).await;
                hub.fall_behind_from(0, u64::MAX);
                check_devices(&state).await;
            }
            _ = beat.tick() => {
                bus.publish(Outgoing::Directory(DirKind::Beat, Vec::new())).await;
                if bus.dirty.load(Ordering::Acquire) {
                    bus.publish_list(&hub).await;
                }
                bus.forget_lapsed_held(now_ms());
                let forgotten = bus.forget_silent(now_ms());
                state.metrics.bus_nodes.set(i64::try_from(bus.other_nodes()).unwrap_or(i64::MAX));
                state.metrics.bus_connected.set(i64::from(bus.is_up()));
                if forgotten > 0 {
                    tracing::info!(nodes = forgotten, "nodes went silent: their devices are offline");
                }
                // A copy stored by a node that had not yet heard where its device is was not
                // forwarded: the sessions announced in the last beat read their queues again.
                let next = hub.next_session();
                hub.fall_behind_from(announced_from, next);
                announced_from = next;
                if !bus.is_up() {
                    check_devices(&state).await;
                }
            }
        }
    }
    bus.publish(Outgoing::Directory(DirKind::Bye, Vec::new()))
        .await;
    let _ = bus.client.flush().await;
}
