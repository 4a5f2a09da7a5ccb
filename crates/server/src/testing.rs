//! What the unit tests of request handling share: a server's state over the store contract's
//! reference engine (`MemoryStore`; the integration tests run the real one), keys and settings in
//! a temporary directory, logged-in devices with outboxes a test reads, and the frames they send.
//!
//! Test code only: nothing here is compiled into the server.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use tidings_core::presence::{Mode, Setting};
use tidings_proto::frame::{self, ErrorCode, Kind, SendMode, SendOutcome};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tidings_store::memory::MemoryStore;
use tidings_store::{IdentityKeys, Store as _};

use crate::clock::now_ms;
use crate::config::ServerArgs;
use crate::hub::{Mailbox, Outbound, Outbox, Registration};
use crate::identity::Identity;
use crate::keys::ServerKeys;
use crate::metrics::Metrics;
use crate::request::Request;
use crate::send::SendOrder;
use crate::state::{Shared, State};

/// A server's state over an in-memory store, with keys and settings in a directory of its own,
/// removed at the end.
pub struct World {
    pub state: Shared<MemoryStore>,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One device of a user, logged in: its identity, its outbox, and (while online) its place in
/// the hub.
pub struct Device {
    pub identity: Identity,
    /// Its account's pseudonym, as requests name the account.
    pub account: Vec<u8>,
    /// The key it logs in with (registered with the device).
    pub login: SigningKey,
    /// Its Olm identity keys, published, and the Ed25519 key that signs with them.
    pub keys: IdentityKeys,
    pub signing: SigningKey,
    pub outbox: Outbox,
    /// The session's order of sends, as a session keeps it.
    pub sends: Option<Arc<SendOrder>>,
    pub online: Option<Registration>,
}

impl World {
    /// A world with the default settings, changed by `settings`.
    pub fn new(name: &str, settings: impl FnOnce(&mut ServerArgs)) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidings-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let config_file = dir.join("server.toml");
        std::fs::write(&config_file, "").expect("config file");
        let mut args = ServerArgs {
            config: Some(config_file),
            data_dir: Some(dir.join("data")),
            key_file: Some(dir.join("server.key")),
            // Read back by `sms_dir`.
            outbox_dir: Some(dir.join("sms")),
            ..ServerArgs::default()
        };
        settings(&mut args);
        let config = args.resolve().expect("settings");
        let keys = ServerKeys::load_or_create(&config.key_file).expect("keys");
        let store = MemoryStore::new();
        let metrics = Arc::new(Metrics::new(&config.node_name));
        let state = Arc::new(State::new(config, store, keys, metrics));
        Self { state, dir }
    }

    /// Where the outbox gateway writes the SMS it sends, one JSON file each.
    pub fn sms_dir(&self) -> PathBuf {
        self.dir.join("sms")
    }

    /// Registers `number` with `devices` devices, each with published identity keys (so each
    /// must get a copy of every message to the number). The first device is online.
    pub async fn user(&self, number: &str, devices: usize) -> Vec<Device> {
        let store = &self.state.store;
        let pseudonym = self.pseudonym(number);
        let mut made = Vec::new();
        for n in 0..devices {
            let id = random_device();
            let login = SigningKey::generate(&mut rand::rngs::OsRng);
            let login_key = login.verifying_key().to_bytes();
            let signing = SigningKey::generate(&mut rand::rngs::OsRng);
            let keys = IdentityKeys {
                identity_key: rand::random(),
                signing_key: signing.verifying_key().to_bytes(),
            };
            let account = if n == 0 {
                let registered = store.register_device(pseudonym, 1, id, login_key, now_ms());
                registered.await.expect("register").account
            } else {
                let account: Identity = made
                    .first()
                    .map(|first: &Device| first.identity)
                    .expect("the first device");
                let linked = store.add_device(account.actor(), id, login_key, keys, 6, now_ms());
                linked.await.expect("link");
                account.account
            };
            let published = store.publish_keys(id, keys, Vec::new(), None, 100);
            published.await.expect("publish");
            let outbox = Mailbox::new();
            let online = (n == 0)
                .then(|| {
                    self.state
                        .hub
                        .add(id, true, Arc::clone(&outbox), usize::MAX)
                        .ok()
                })
                .flatten();
            // Online to everyone, as before presence could be chosen; tests of the modes set
            // their own.
            let everyone = Setting {
                mode: Mode::Everyone,
                key: [0; 32],
            };
            self.state.hub.set_presence(&id, &outbox, everyone);
            made.push(Device {
                identity: Identity {
                    device: id,
                    account,
                    budgets: self.state.keys.budget_key(&pseudonym),
                },
                account: pseudonym.0.to_vec(),
                login,
                keys,
                signing,
                outbox,
                sends: None,
                online,
            });
        }
        made
    }

    pub fn pseudonym(&self, number: &str) -> tidings_store::Pseudonym {
        let number = E164::parse(number).expect("a number");
        self.state.keys.pseudonym(&number).expect("a pseudonym")
    }

    /// Decodes `kind` and runs it as `device`'s session would, to the end.
    pub async fn run(&self, device: &mut Device, kind: Kind) {
        let request = Request::from_frame(kind.into()).expect("a request");
        let task = request.run(
            Arc::clone(&self.state),
            device.identity,
            Arc::clone(&device.outbox),
            &mut device.sends,
        );
        task.await;
    }

    /// Runs `kind` for `device` and takes the one answer it queued.
    pub async fn ask(&self, device: &mut Device, kind: Kind) -> Kind {
        self.run(device, kind).await;
        let mut answers = take_all(&device.outbox);
        assert_eq!(answers.len(), 1, "one answer: {answers:?}");
        answers.remove(0)
    }
}

pub fn random_device() -> DeviceId {
    DeviceId(rand::random())
}

pub fn random_id() -> MessageId {
    MessageId(rand::random())
}

/// Everything queued in an outbox, as frame kinds (a sign-out as a `SignedOut`).
pub fn take_all(outbox: &Outbox) -> Vec<Kind> {
    std::iter::from_fn(|| outbox.try_recv())
        .map(|message| match message {
            Outbound::Frame(frame) | Outbound::Deliver(frame) => frame.kind.expect("a kind"),
            Outbound::SignOut(reason) => Kind::SignedOut(frame::SignedOut {
                reason: reason.into(),
            }),
        })
        .collect()
}

/// A send of `id` to `to` with one copy per device in `copies`.
pub fn send_to(to: &[u8], id: MessageId, copies: &[DeviceId], mode: SendMode) -> Kind {
    Kind::Send(frame::Send {
        id: id.as_bytes().to_vec(),
        to_account: to.to_vec(),
        mode: mode as i32,
        copies: copies
            .iter()
            .map(|device| frame::Copy {
                device_id: device.as_bytes().to_vec(),
                payload: Bytes::from_static(b"ciphertext"),
            })
            .collect(),
        ..frame::Send::default()
    })
}

pub fn ids(devices: &[&Device]) -> Vec<DeviceId> {
    devices.iter().map(|d| d.identity.device).collect()
}

pub fn ack_of(sender: &Device, id: MessageId) -> Kind {
    Kind::Ack(frame::Ack {
        sender_device: sender.identity.device.as_bytes().to_vec(),
        id: id.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// A `SendResult`'s outcome, detail and device difference.
pub fn send_result(answer: Kind) -> (SendOutcome, String, [Vec<Vec<u8>>; 3]) {
    let Kind::SendResult(result) = answer else {
        panic!("not a send result: {answer:?}");
    };
    let outcome = SendOutcome::try_from(result.outcome).expect("an outcome");
    let difference = [
        result.missing_devices,
        result.missing_own_devices,
        result.extra_devices,
    ];
    (outcome, result.detail, difference)
}

pub fn error_of(answer: &Kind) -> (ErrorCode, &str, u64) {
    let Kind::Error(error) = answer else {
        panic!("not an error: {answer:?}");
    };
    assert!(!error.fatal, "a request's error never ends the session");
    let code = ErrorCode::try_from(error.code).expect("an error code");
    (code, error.message.as_str(), error.request_id)
}
