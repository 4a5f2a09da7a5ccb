//! One function per client subcommand: each opens what it needs through `tidings_client`, does
//! one thing and prints its result (text, or one JSON object per line with `--json`). The exit
//! code each returns is documented in `cli.rs`. Nothing here decides a default or a rule: those
//! are in the client crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tidings_client::client::{self, Client, Event, SendReport};
use tidings_client::inbox::Change;
use tidings_client::profile::{Profile, ShowOnline};
use tidings_client::route;
use tidings_client::vault::Passphrase;
use tidings_client::{defaults, ClientError};
use tidings_core::fallback::Route;
use tidings_gateway::modem::ModemConfig;
use tidings_gateway::smpp::{BindMode, Concatenation, SmppConfig};
use tidings_gateway::TransportConfig;
use tidings_proto::frame::{Presence, ReceiptKind, SendMode, SendOutcome};
use tidings_proto::id::DeviceId;

use tidings_server::config::ServerArgs;

use crate::cli::{
    LinkArgs, Mode, RegisterArgs, SendArgs, ServerAction, SettingsArgs, EXIT_NOT_TAKEN,
    EXIT_PENDING,
};

/// What every client command starts from: the profile, the output format, and where the
/// passphrase comes from.
#[derive(Debug)]
pub struct Context {
    pub profile: Profile,
    pub json: bool,
    pub passphrase_file: Option<PathBuf>,
}

impl Context {
    /// The context of one run: the profile in `profile`, else the default directory.
    pub fn new(profile: Option<PathBuf>, json: bool, passphrase_file: Option<PathBuf>) -> Self {
        Self {
            profile: Profile::at(profile.unwrap_or_else(defaults::profile_dir)),
            json,
            passphrase_file,
        }
    }

    /// The profile's passphrase: from `--passphrase-file`, else `TIDINGS_PASSPHRASE`, else a
    /// prompt on the terminal.
    fn passphrase(&self) -> anyhow::Result<Passphrase> {
        if let Some(file) = &self.passphrase_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                anyhow::anyhow!("cannot read the passphrase file {}: {e}", file.display())
            })?;
            return Ok(Passphrase::new(text));
        }
        if let Ok(text) = std::env::var("TIDINGS_PASSPHRASE") {
            return Ok(Passphrase::new(text));
        }
        rpassword::prompt_password("Passphrase for this profile: ")
            .map(Passphrase::new)
            .map_err(|e| {
                anyhow::anyhow!(
                    "no passphrase: there is no terminal to ask on ({e}); set TIDINGS_PASSPHRASE or pass --passphrase-file"
                )
            })
    }

    /// The registered profile, opened without its passphrase (nothing sealed is read).
    fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::open(self.profile.clone())?)
    }

    /// The registered profile with its passphrase. An unregistered profile is refused before
    /// the passphrase is asked for.
    fn unlocked(&self) -> anyhow::Result<Client> {
        let client = Client::open(self.profile.clone())?;
        Ok(client.with_passphrase(self.passphrase()?))
    }
}

/// Prints one JSON object on its own line.
fn print_json(value: serde_json::Value) {
    println!("{value}");
}

/// Prints now rather than when the buffer fills: another program may be reading line by line.
fn flush() {
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// `tidings register`: opt in; the server sends a code by SMS.
pub async fn register(context: &Context, args: RegisterArgs) -> anyhow::Result<ExitCode> {
    let RegisterArgs {
        number,
        server,
        by_own_sms,
        trust,
    } = args;
    if by_own_sms {
        return register_own_sms(context, &number, &server, trust.into_trust()).await;
    }
    let number = client::register(&context.profile, &number, &server, trust.into_trust()).await?;
    if context.json {
        print_json(json!({ "status": "code_sent", "number": number.as_str() }));
    } else {
        println!(
            "A code was sent by SMS to {}. Run: tidings verify <code>",
            number.as_str()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings register --by-own-sms`: shows what to text and where, waits for the server to have
/// the SMS, then finishes like `verify`.
async fn register_own_sms(
    context: &Context,
    number: &str,
    server: &str,
    trust: tidings_client::profile::Trust,
) -> anyhow::Result<ExitCode> {
    // Asked first, so that a missing passphrase costs no declaration.
    let passphrase = context.passphrase()?;
    let own = client::register_own_sms(&context.profile, number, server, trust).await?;
    if context.json {
        print_json(json!({
            "status": "text_to_send",
            "number": own.number.as_str(),
            "service_number": own.service_number,
            "text": own.text,
            "expires_in": own.expires_in,
        }));
    } else {
        println!(
            "Send this SMS from {} to {} within {} minutes:",
            own.number.as_str(),
            own.service_number,
            own.expires_in.div_ceil(60)
        );
        println!("{}", own.text);
        println!("Waiting for it to arrive...");
    }
    flush();
    let wait = Duration::from_secs(own.expires_in);
    let replaced = client::verify_own_sms(&context.profile, &own.code, &passphrase, wait).await?;
    print_registered(context, replaced)?;
    Ok(ExitCode::SUCCESS)
}

/// Says that this device is registered, and how many devices it replaced.
fn print_registered(context: &Context, replaced: u32) -> anyhow::Result<()> {
    let client = context.client()?;
    if context.json {
        print_json(
            json!({ "status": "registered", "device_id": client.device().to_text(), "replaced_devices": replaced }),
        );
    } else {
        println!("Registered {} on this device.", client.number());
        if replaced > 0 {
            println!("{replaced} earlier device(s) of this number were signed out.");
        }
    }
    Ok(())
}

/// `tidings verify`: finish opting in with the code.
pub async fn verify(context: &Context, code: &str) -> anyhow::Result<ExitCode> {
    // Not registered: say so before asking for anything (and touch nothing).
    if context.profile.load()?.is_none() {
        return Err(ClientError::NotRegistered.into());
    }
    let replaced = client::verify(&context.profile, code, &context.passphrase()?).await?;
    print_registered(context, replaced)?;
    Ok(ExitCode::SUCCESS)
}

/// `tidings send`: over IP only, or along a route with SMS fallback.
pub async fn send(context: &Context, args: SendArgs) -> anyhow::Result<ExitCode> {
    let SendArgs {
        number,
        text,
        route,
        fallback_after,
        mode,
        ttl,
        wait,
    } = args;
    let client = context.unlocked()?;
    let (route_name, route) = route::choose_route(client.routing(), route, fallback_after)?;
    let wait = Duration::from_secs(wait);
    if let Route::IpOnly { .. } = route {
        let mode = match mode {
            Mode::Queue => SendMode::Queue,
            Mode::NowOrNever => SendMode::NowOrNever,
        };
        let report = client.send(&number, &text, mode, ttl, wait).await?;
        print_send(&report, context.json);
        return Ok(match report.outcome {
            _ if !report.settled => ExitCode::from(EXIT_PENDING),
            Some(SendOutcome::Accepted | SendOutcome::Queued) => ExitCode::SUCCESS,
            _ => ExitCode::from(EXIT_NOT_TAKEN),
        });
    }
    let status = client.send_routed(&number, &text, route, wait).await?;
    Ok(print_routed(&route_name, &status, context.json))
}

/// `tidings listen`: receive until `count` messages were shown or `timeout` seconds passed.
pub async fn listen(
    context: &Context,
    count: Option<usize>,
    timeout: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let until = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut shown = 0usize;
    let own = client.number().to_string();
    client
        .listen(until, |event| {
            print_event(&event, context.json, &own);
            if matches!(event, Event::Message(_)) {
                shown += 1;
            }
            count.is_none_or(|count| shown < count)
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `tidings link`: with no number and code, show a link code here and wait for the new device;
/// with both, join the number as a new device.
pub async fn link(context: &Context, args: LinkArgs) -> anyhow::Result<ExitCode> {
    let LinkArgs {
        number,
        code,
        server,
        trust,
        wait,
    } = args;
    match (number, code) {
        (None, None) => approve_link(context, Duration::from_secs(wait)).await,
        (Some(number), Some(code)) => {
            let Some(server) = server else {
                anyhow::bail!("the new device needs the server: add --server <url>");
            };
            let passphrase = context.passphrase()?;
            let joined = client::link(
                &context.profile,
                &number,
                &code,
                &server,
                trust.into_trust(),
                &passphrase,
            )
            .await?;
            if context.json {
                let devices: Vec<serde_json::Value> = joined
                    .others
                    .iter()
                    .map(|(id, print)| json!({ "device_id": id.to_text(), "fingerprint": print }))
                    .collect();
                print_json(json!({
                    "status": "linked",
                    "device_id": joined.device.to_text(),
                    "fingerprint": joined.fingerprint,
                    "devices": devices,
                }));
            } else {
                println!(
                    "This device joined {number}; the number's other devices stay signed in.\nThis device's fingerprint: {}\nThe number's other devices (compare with the screen that showed the link string):",
                    joined.fingerprint
                );
                for (id, print) in &joined.others {
                    println!("  {id}  {print}");
                }
                println!("The device that showed the link string vouches for this one once it has checked it.");
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => anyhow::bail!(
            "give both the number and the link code (new device), or neither (registered device)"
        ),
    }
}

/// The registered device's side of `tidings link`.
async fn approve_link(context: &Context, wait: Duration) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let json = context.json;
    let joined = client
        .approve_link(
            |offer| {
                if json {
                    print_json(json!({
                        "status": "code",
                        "code": offer.link,
                        "expires_in": offer.expires_in,
                        "fingerprint": offer.fingerprint,
                    }));
                } else {
                    println!(
                        "On the new device run:\n  tidings link {} {} --server <url>\nor scan this with it:\n{}\nThis device's fingerprint: {}\nThe link string is valid for {} minutes and works once. Show it to nobody else: it proves the new device is the one you are linking. Waiting...",
                        client.number(),
                        offer.link,
                        qr_code(&offer.link),
                        offer.fingerprint,
                        offer.expires_in / 60
                    );
                }
                flush();
            },
            wait,
        )
        .await?;
    match joined {
        Some(approved) if json => print_json(json!({
            "status": "linked",
            "device_id": approved.device.to_text(),
            "fingerprint": approved.fingerprint,
        })),
        Some(approved) => println!(
            "Device {} joined this number and was vouched for. Its fingerprint: {}\nCompare it with what the new device shows.",
            approved.device, approved.fingerprint
        ),
        None => {
            anyhow::bail!("no device joined in time: run `tidings link` again for a new code")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` as a QR code in the terminal, two rows per line (empty if it does not fit in one).
fn qr_code(text: &str) -> String {
    use qrcode::render::unicode::Dense1x2;
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<Dense1x2>()
            .dark_color(Dense1x2::Light)
            .light_color(Dense1x2::Dark)
            .build(),
        Err(_) => String::new(),
    }
}

/// `tidings devices`: list this number's devices, or remove one.
pub async fn devices(context: &Context, remove: Option<String>) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    if let Some(id) = remove {
        let Some(device) = DeviceId::from_text(&id) else {
            anyhow::bail!("that is not a device id: copy one from `tidings devices`");
        };
        client.remove_device(device).await?;
        if context.json {
            print_json(json!({ "status": "removed", "device_id": device.to_text() }));
        } else {
            println!("Removed device {device}: its keys and queued messages are deleted.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for device in client.devices().await? {
        let key = device
            .identity_key
            .map(|k| tidings_proto::id::to_text(&k))
            .unwrap_or_else(|| "(no keys published yet)".into());
        if context.json {
            print_json(
                json!({ "device_id": device.id.to_text(), "identity_key": key, "this_device": device.this_device }),
            );
        } else {
            let this = if device.this_device {
                "\t(this device)"
            } else {
                ""
            };
            println!("{}\t{key}{this}", device.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings fingerprint`: the safety number with a contact.
pub async fn fingerprint(context: &Context, number: &str) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let print = client.fingerprint(number).await?;
    let status = if !print.known {
        "not yet trusted (trusted on first message)"
    } else if print.untrusted > 0 {
        "CHANGED: keys you have not trusted; compare, then `tidings trust`"
    } else {
        "trusted"
    };
    if context.json {
        print_json(json!({
            "number": print.number,
            "safety_number": print.safety_number,
            "devices": print.devices,
            "untrusted_keys": print.untrusted,
            "known": print.known,
        }));
    } else {
        println!(
            "Safety number with {} ({} device(s), {status}):\n  {}\nCompare it with theirs; equal means nobody is in between.",
            print.number, print.devices, print.safety_number
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings trust`: trust a contact's current keys.
pub async fn trust(context: &Context, number: &str) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let keys = client.trust(number).await?;
    if context.json {
        print_json(json!({ "status": "trusted", "keys": keys }));
    } else {
        println!("Trusted the {keys} current key(s) of {number}.");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings lookup`: online, offline or not a user, per number.
pub async fn lookup(context: &Context, numbers: &[String]) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    for (number, presence) in client.lookup(numbers).await? {
        if context.json {
            print_json(json!({ "number": number, "presence": presence.as_str() }));
        } else {
            println!("{number}\t{}", presence_shown(presence));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `tidings lookup` shows a presence: a user not shown online may be offline or may not
/// show itself to this device, and it still gets messages.
fn presence_shown(presence: Presence) -> &'static str {
    match presence {
        Presence::Online => "online",
        Presence::Offline => "a user, not reachable now",
        Presence::NotAUser => "not a user",
    }
}

/// `tidings repin`: pin the server's discovery key again.
pub async fn repin(context: &Context) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let key = client.repin().await?;
    if context.json {
        print_json(json!({ "status": "pinned", "key_version": key.key_version }));
    } else {
        println!(
            "Pinned the server's discovery key (version {}); contacts' pseudonyms are derived again when next needed.",
            key.key_version
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings server rotate-oprf-key` and `tidings server retire-oprf-key`: change the key file;
/// the server reads it at its next start.
pub fn server_key(action: ServerAction, args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let key_file = |given: Option<PathBuf>| -> anyhow::Result<PathBuf> {
        match given {
            Some(path) => Ok(path),
            None => Ok(args.resolve()?.key_file),
        }
    };
    match action {
        ServerAction::RotateOprfKey { key_file: given } => {
            let path = key_file(given)?;
            let version = tidings_server::keys::rotate_oprf_key(&path)?;
            println!(
                "Made discovery key version {version} in {}; the previous one is kept for accounts not yet moved. Takes effect when the server next starts: restart it. Retire the previous key (tidings server retire-oprf-key) once tidings_accounts_on_previous_oprf_key is 0.",
                path.display()
            );
        }
        ServerAction::RetireOprfKey { key_file: given } => {
            let path = key_file(given)?;
            match tidings_server::keys::retire_oprf_key(&path)? {
                Some(version) => println!(
                    "Retired discovery key version {version} in {}. Takes effect when the server next starts: restart it.",
                    path.display()
                ),
                None => println!("{} holds no previous discovery key: nothing to retire.", path.display()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings disable`: opt out.
pub async fn disable(context: &Context) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    client.disable().await?;
    if context.json {
        print_json(json!({ "status": "disabled" }));
    } else {
        println!("Disabled. The server deleted your account, devices, keys and queued messages.");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidings settings`: change the profile's routing, SMS transport and presence (no network),
/// or make a new contact token and publish it (`--rotate-contact-token`, the one flag that needs
/// the server), then show them. A new presence mode, or `--presence-rotate`, makes a new presence
/// key (sealed: this needs the passphrase); a listening session sends them at its next login.
pub async fn settings(context: &Context, settings: SettingsArgs) -> anyhow::Result<ExitCode> {
    let mut data = context.profile.load()?.ok_or(ClientError::NotRegistered)?;
    let rotate_contact_token = settings.rotate_contact_token;
    let mut rotate = settings.presence_rotate;
    if let Some(mode) = settings.presence.as_deref().and_then(ShowOnline::parse) {
        rotate |= mode != data.presence;
        data.presence = mode;
    }
    if rotate {
        let client = context.unlocked()?;
        let mut inbox = client.inbox()?;
        inbox.update(|_, crypto| {
            crypto.rotate_presence_key();
            Ok(Change::Save(()))
        })?;
    }
    let routing = &mut data.routing;
    if let Some(route) = settings.route.clone() {
        routing.route = route;
    }
    if let Some(seconds) = settings.fallback_after {
        routing.fallback_after_seconds = seconds;
    }
    if let Some(seconds) = settings.receipt_timeout {
        routing.receipt_timeout_seconds = seconds;
    }
    if let Some(parts) = settings.max_sms_parts {
        routing.set_max_sms_parts(parts);
    }
    if let Some(transport) = sms_transport(settings) {
        routing.sms = transport;
    }
    context.profile.save(&data)?;
    if rotate_contact_token {
        context.unlocked()?.rotate_contact_token().await?;
    }
    let routing = &data.routing;
    let sms = match &routing.sms {
        None => "none".to_string(),
        Some(TransportConfig::Outbox { dir }) => format!("outbox {}", dir.display()),
        Some(TransportConfig::Kannel { url, username, .. }) => {
            format!("kannel {url} (user {username})")
        }
        Some(TransportConfig::Smpp(smpp)) => {
            format!("smpp {} (system_id {})", smpp.address, smpp.system_id)
        }
        Some(TransportConfig::Modem(modem)) => {
            format!("modem {} at {} baud", modem.port.display(), modem.baud)
        }
    };
    let presence = data.presence.as_str();
    if context.json {
        print_json(json!({
            "presence": presence,
            "presence_key_rotated": rotate,
            "route": routing.route,
            "fallback_after_seconds": routing.fallback_after_seconds,
            "receipt_timeout_seconds": routing.receipt_timeout_seconds,
            "max_sms_parts": routing.max_sms_parts,
            "sms": sms,
            "contact_token_rotated": rotate_contact_token,
        }));
    } else {
        if rotate_contact_token {
            println!(
                "A new contact token is published: the people you wrote to are strangers here (few of their messages kept, for 3 days at most) until you write to them again."
            );
        }
        println!(
            "online shown to {presence}{}; route {}; fallback after {} s; receipt timeout {} s; at most {} SMS parts; SMS transport: {sms}",
            if rotate { " (new presence key)" } else { "" },
            routing.route, routing.fallback_after_seconds, routing.receipt_timeout_seconds, routing.max_sms_parts
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The SMS transport the flags ask for: `Some(None)` to remove it, `None` to keep the profile's.
/// Where the flags name several (clap refuses most such mixes), the later in this order wins:
/// outbox, SMPP, modem, Kannel, removal.
fn sms_transport(settings: SettingsArgs) -> Option<Option<TransportConfig>> {
    let SettingsArgs {
        sms_outbox,
        sms_kannel,
        sms_username,
        sms_password,
        sms_smpp,
        sms_system_id,
        sms_system_type,
        sms_bind,
        sms_concatenation,
        sms_receipt_wait,
        sms_modem,
        sms_baud,
        sms_modem_timeout,
        no_sms,
        ..
    } = settings;
    let mut transport = None;
    if let Some(dir) = sms_outbox {
        transport = Some(Some(TransportConfig::Outbox { dir }));
    }
    if let (Some(address), Some(system_id), Some(password)) =
        (sms_smpp, sms_system_id, sms_password.clone())
    {
        transport = Some(Some(TransportConfig::Smpp(SmppConfig {
            address,
            system_id,
            password,
            system_type: sms_system_type.unwrap_or_default(),
            bind: match sms_bind.as_deref() {
                Some("transmitter") => BindMode::Transmitter,
                _ => BindMode::Transceiver,
            },
            concatenation: match sms_concatenation.as_deref() {
                Some("sar") => Concatenation::Sar,
                _ => Concatenation::Udh,
            },
            enquire_link_seconds: defaults::SMPP_ENQUIRE_LINK_SECONDS,
            receipt_wait_seconds: sms_receipt_wait.unwrap_or(0),
        })));
    }
    if let Some(port) = sms_modem {
        transport = Some(Some(TransportConfig::Modem(ModemConfig {
            port,
            baud: sms_baud,
            timeout_seconds: sms_modem_timeout,
        })));
    }
    if let (Some(url), Some(username), Some(password)) = (sms_kannel, sms_username, sms_password) {
        transport = Some(Some(TransportConfig::Kannel {
            url,
            username,
            password,
        }));
    }
    if no_sms {
        transport = Some(None);
    }
    transport
}

/// `tidings status`: this profile's state (no network).
pub fn status(context: &Context) -> anyhow::Result<ExitCode> {
    let data = context.profile.load()?;
    let registered = data.is_some();
    let verified = data.as_ref().is_some_and(|d| d.device_id.is_some());
    if context.json {
        print_json(json!({
            "registered": registered,
            "verified": verified,
            "number": data.as_ref().map(|d| d.number.clone()),
            "server": data.as_ref().map(|d| d.server.clone()),
        }));
    } else if let Some(data) = data {
        let state = if verified {
            "registered"
        } else {
            "waiting for `tidings verify <code>`"
        };
        println!("{} at {}: {state}", data.number, data.server);
    } else {
        println!("Not registered: nothing is sent anywhere until you run `tidings register`.");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `send` says of a message kept in the profile because it was not settled in time.
const NOT_YET_SETTLED: &str = "not yet settled: it will be sent again by `tidings listen`";

/// `tidings history`: every message the profile keeps, received (shown or not) and sent (with
/// the phase of its route and, once finished, its outcome).
pub fn history(context: &Context) -> anyhow::Result<ExitCode> {
    let client = context.unlocked()?;
    let inbox = client.inbox()?;
    for (message, shown) in inbox.history_with_shown()? {
        if context.json {
            print_json(json!({
                "type": "received",
                "id": message.id.to_text(),
                "sender_device": message.sender_device.to_text(),
                "from": message.from,
                "to": message.to,
                "text": message.text,
                "shown": shown,
            }));
        } else {
            let state = if shown { "shown" } else { "not shown yet" };
            println!("from {}: {} ({state})", message.from, message.text);
        }
    }
    for kept in inbox.outgoing(true)? {
        let (id, to, text, done) = (kept.id, kept.receiver, kept.body, kept.done);
        let state: serde_json::Value = serde_json::from_str(&kept.state).unwrap_or_default();
        let phase = state["phase"]["kind"].as_str().unwrap_or("unknown");
        let outcome = state["phase"]["outcome"].as_str();
        if context.json {
            print_json(json!({
                "type": "sent",
                "id": id.to_text(),
                "to": to,
                "text": text,
                "phase": phase,
                "outcome": outcome,
                "done": done,
            }));
        } else {
            let state = outcome.unwrap_or(phase).replace('_', " ");
            println!("to {to}: {text} ({state})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_send(report: &SendReport, json: bool) {
    let receipt = report.receipt.map(|kind| match kind {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Expired => "expired",
    });
    if json {
        println!(
            "{}",
            json!({
                "id": report.id.to_text(),
                "outcome": report.outcome.map(SendOutcome::as_str),
                "settled": report.settled,
                "note": (!report.settled).then_some(NOT_YET_SETTLED),
                "receipt": receipt,
                "copies": report.copies,
                "skipped_own_devices": report.skipped_own_devices,
                "retry_after": report.retry_after.map(|wait| wait.as_secs()),
                "ttl_seconds": report.kept_for.map(|kept| kept.as_secs()),
                "detail": (!report.detail.is_empty()).then_some(&report.detail),
            })
        );
        return;
    }
    if report.skipped_own_devices > 0 {
        eprintln!(
            "warning: {} of your own devices will miss this message: their queue on the server is full (they have been offline); each is told how many messages it missed when it comes online",
            report.skipped_own_devices
        );
    }
    let Some(outcome) = report.outcome else {
        println!("no answer from the server yet; {NOT_YET_SETTLED}");
        return;
    };
    if let (SendOutcome::RateLimited, Some(retry_after)) = (outcome, report.retry_after) {
        let refusal = ClientError::RetryLater {
            message: "refused by the server's limits (too many messages, or the lookup budget is used up)".into(),
            retry_after,
        };
        println!("not sent: {refusal}");
        return;
    }
    let text = match (outcome, receipt) {
        (SendOutcome::Accepted, Some("delivered")) => "delivered",
        (SendOutcome::Accepted, _) => {
            "accepted: a device of the receiver is online; no receipt yet"
        }
        (SendOutcome::Queued, _) => "queued: it will be delivered when the receiver comes online",
        (SendOutcome::RefusedNotReachable, _) => {
            "not sent: the receiver is not online now (nothing was stored)"
        }
        (SendOutcome::NotAUser, _) => "not sent: that number does not use Tidings",
        (SendOutcome::RefusedQueueFull, _) => {
            "not sent: the receiver's queue holds as much as it takes from you; try again once it is delivered"
        }
        (SendOutcome::RefusedOverQuota, _) => {
            "not sent: you have as much waiting for delivery as the server keeps; try again once some is delivered"
        }
        (SendOutcome::RefusedStrangerPoolFull, _) => &stranger_pool_full(),
        (SendOutcome::RateLimited, _) => "not sent: too many messages, slow down",
        (SendOutcome::Invalid, _) => "not sent: the server found the message invalid",
        (SendOutcome::Unavailable, _) => "not sent: the server could not store it now; try again",
        (SendOutcome::DevicesChanged, _) => {
            "not sent: the receiver's devices changed while sending; try again"
        }
    };
    println!("{text}");
    if !report.settled {
        println!("{NOT_YET_SETTLED}");
    }
    if let Some(kept) = report.kept_for {
        println!(
            "kept at most {}: the receiver has not written to you",
            in_days(kept)
        );
    }
    // What else the server said (the line above says the rest in the client's words).
    for part in report.detail.split("; ") {
        if !part.is_empty()
            && !part.starts_with("kept at most")
            && !part.starts_with("not kept for")
        {
            println!("{part}");
        }
    }
}

/// What `send` says when the receiver's room for strangers' messages is full.
fn stranger_pool_full() -> String {
    let ttl = Duration::from_millis(tidings_core::delivery::STRANGER_TTL);
    format!(
        "not sent: the receiver accepts few messages from people it has not written to, and that room is full now; it frees as those are delivered or expire, within {}: try again later, or ask them to write to you first",
        in_days(ttl)
    )
}

/// A length of time in whole days when it is some, else in hours (rounded up).
fn in_days(length: Duration) -> String {
    const DAY: u64 = 86_400;
    match (length.as_secs() / DAY, length.as_secs() % DAY) {
        (1, 0) => "1 day".to_string(),
        (days, 0) if days > 1 => format!("{days} days"),
        _ => format!("{} hours", length.as_secs().div_ceil(3_600)),
    }
}

fn print_routed(route: &str, status: &route::Status, json: bool) -> ExitCode {
    let outcome = status.outcome.map(route::outcome_name);
    if json {
        println!(
            "{}",
            json!({
                "id": status.id.to_text(),
                "route": route,
                "outcome": outcome,
                "pending": outcome.is_none(),
                "detail": status.detail,
            })
        );
    } else {
        let text = match outcome {
            Some("delivered") => "delivered over IP".to_string(),
            Some("sent_as_sms") => "sent as SMS".to_string(),
            Some("expired") => "not delivered: it expired on the server".to_string(),
            Some("sms_rejected") => format!("not sent: {}", status.detail),
            Some("refused_stranger_pool_full") => stranger_pool_full(),
            Some(refused) if status.detail.is_empty() => {
                format!("not sent: {}", refused.replace('_', " "))
            }
            Some(refused) => format!(
                "not sent: {} ({})",
                refused.replace('_', " "),
                status.detail
            ),
            None if status.detail.is_empty() => {
                "not through yet: it is kept and carried on while `tidings listen` runs".to_string()
            }
            None => format!(
                "not through yet ({}): it is kept and retried while `tidings listen` runs",
                status.detail
            ),
        };
        println!("{text}");
    }
    match outcome {
        Some("delivered" | "sent_as_sms") => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(EXIT_NOT_TAKEN),
        None => ExitCode::from(EXIT_PENDING),
    }
}

fn print_event(event: &Event, json: bool, own: &str) {
    match event {
        Event::Routed {
            id,
            outcome,
            detail,
        } => {
            if json {
                println!(
                    "{}",
                    json!({ "type": "routed", "id": id.to_text(), "outcome": outcome, "detail": detail })
                );
            } else {
                println!("message {id}: {}", outcome.replace('_', " "));
            }
        }

        Event::Message(message) => {
            if json {
                println!(
                    "{}",
                    json!({
                        "type": "message",
                        "id": message.id.to_text(),
                        "sender_device": message.sender_device.to_text(),
                        "from": message.from,
                        "text": message.text,
                        "to": message.to,
                        "sent_at_ms": message.sent_at_ms,
                        "sender_verified": message.sender_verified,
                        "warning": message.warning,
                    })
                );
            } else if let Some(warning) = &message.warning {
                println!("WARNING: {warning}: {}", message.text);
            } else if message.from == own && !message.to.is_empty() && message.to != own {
                println!(
                    "(you, from another device) to {}: {}",
                    message.to, message.text
                );
            } else {
                println!("{}: {}", message.from, message.text);
            }
        }
        // On stderr in both modes: stdout carries only what arrived.
        Event::Reconnecting { after, reason } => {
            eprintln!("{reason}; reconnecting in {:.1} s", after.as_secs_f64());
        }
        Event::Rejected {
            sender_device,
            id,
            reason,
        } => {
            if json {
                println!(
                    "{}",
                    json!({ "type": "rejected", "id": id.to_text(), "sender_device": sender_device.to_text(), "reason": reason })
                );
            } else {
                eprintln!("rejected a message from device {sender_device}: {reason}");
            }
        }
        Event::Missed { messages } => {
            if json {
                println!("{}", json!({ "type": "missed", "messages": messages }));
            } else {
                println!(
                    "WARNING: {messages} message(s) sent from your other devices were not kept for this device while it was away (its queue was full): they will not be shown here"
                );
            }
        }
        Event::Receipt { id, kind } => {
            let kind = match kind {
                ReceiptKind::Delivered => "delivered",
                ReceiptKind::Expired => "expired",
            };
            if json {
                println!(
                    "{}",
                    json!({ "type": "receipt", "id": id.to_text(), "kind": kind })
                );
            } else {
                println!("receipt: message {id} {kind}");
            }
        }
    }
    flush();
}
