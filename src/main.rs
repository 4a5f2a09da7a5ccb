//! `tidings`: the server and the command-line client in one binary. This file only parses
//! arguments, installs logging and maps results to output and exit codes; the work is in the
//! `tidings-server` and `tidings-client` crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tidings_client::client::{self, Client, Event, SendReport};
use tidings_client::profile::{Profile, Trust};
use tidings_client::route;
use tidings_client::vault::Passphrase;
use tidings_client::ClientError;
use tidings_core::fallback::Route;
use tidings_gateway::modem::ModemConfig;
use tidings_gateway::smpp::{BindMode, Concatenation, SmppConfig};
use tidings_gateway::TransportConfig;
use tidings_proto::frame::{ReceiptKind, SendMode, SendOutcome};
use tidings_proto::id::DeviceId;
use tidings_server::config::ServerArgs;

/// Exit code: the message was not taken (not a user, not reachable, refused, rate-limited).
const EXIT_NOT_TAKEN: u8 = 3;
/// Exit code: the profile is not registered, so nothing was sent anywhere.
const EXIT_NOT_REGISTERED: u8 = 4;
/// Exit code: not through yet (SMS gateway down, server unreachable for a withdraw, a delayed
/// fallback waiting); kept in the profile and carried on by `tidings listen`.
const EXIT_PENDING: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Opt-in phone-number messaging over IP",
    long_about = "Tidings sends text messages over IP between people identified by phone number.\n\
        Nothing leaves this machine until you register; numbers reach the server only as\n\
        pseudonyms it cannot reverse; disabling deletes everything the server had.\n\n\
        Start a server:        tidings server\n\
        Opt in:                tidings register +4915112345678 --server http://127.0.0.1:7433\n\
                               tidings verify 123456\n\
        Who can I reach?       tidings lookup +4915187654321\n\
        Send and receive:      tidings send +4915187654321 'Hello'   /   tidings listen\n\
        Check who it is:       tidings fingerprint +4915187654321\n\
        Another device:        tidings link   (on this one)   /   tidings link <number> <code> --server <url>\n\
        Opt out:               tidings disable\n\n\
        Keys and messages in the profile are encrypted under a passphrase: from --passphrase-file,\n\
        else TIDINGS_PASSPHRASE, else a prompt.",
    after_help = "Exit codes: 0 done; 1 failed (see the message); 2 bad usage; 3 the message was not taken\n\
        (not a user, not reachable, queue full, rate-limited); 4 this profile is not registered;\n\
        5 not through yet: kept, and carried on while `tidings listen` runs."
)]
struct Cli {
    /// Profile directory: one per user of this machine [default: $XDG_DATA_HOME/tidings/profile]
    #[arg(long, env = "TIDINGS_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// Print results as JSON (one object per line)
    #[arg(long, global = true)]
    json: bool,
    /// Log filter, such as `info` or `tidings_server=debug` [default: info for the server, warn otherwise]
    #[arg(long, env = "TIDINGS_LOG", global = true)]
    log: Option<String>,
    /// Read the profile's passphrase from this file (else TIDINGS_PASSPHRASE, else a prompt)
    #[arg(long, env = "TIDINGS_PASSPHRASE_FILE", global = true)]
    passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// Keep it on the server until a device of the receiver takes it, or until its TTL ends
    Queue,
    /// Only if a device of the receiver is online now; otherwise nothing is stored
    NowOrNever,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (embedded storage; see docs/CONFIGURATION.md)
    Server(Box<ServerArgs>),
    /// Opt in: save the server in this profile and have a code sent to your number by SMS
    Register {
        /// Your phone number in international form, such as +4915112345678
        number: String,
        /// The server's URL, such as https://tidings.example:7433
        #[arg(long, env = "TIDINGS_SERVER")]
        server: String,
        /// Trust the server's certificate through this CA file (PEM)
        #[arg(long, conflicts_with = "pin")]
        ca: Option<PathBuf>,
        /// Trust exactly the server certificate with this SHA-256 fingerprint (hex)
        #[arg(long)]
        pin: Option<String>,
        /// Allow plain http:// to a server that is not on this machine
        #[arg(long)]
        insecure: bool,
    },
    /// Finish opting in with the 6-digit code from the SMS
    Verify {
        /// The code
        code: String,
    },
    /// Send a text message
    Send {
        /// The receiver's phone number
        number: String,
        /// The text
        text: String,
        /// Route: auto (IP if the receiver is online, else SMS), ip-only, sms-only, or
        /// queue-then-sms (IP, then SMS if undelivered after --fallback-after) [default: the
        /// profile's; auto needs an SMS transport, without one messages queue over IP]
        #[arg(long, value_parser = ["auto", "ip-only", "sms-only", "queue-then-sms"])]
        route: Option<String>,
        /// For queue-then-sms: how long to wait for delivery over IP, such as 90s, 10m or 1h
        #[arg(long, value_parser = parse_duration)]
        fallback_after: Option<u64>,
        /// For ip-only: keep the message until delivered (queue), or only if a device is online now
        #[arg(long, value_enum, default_value_t = Mode::Queue)]
        mode: Mode,
        /// Seconds a queued message is kept (0: the server's default, 7 days)
        #[arg(long, default_value_t = 0)]
        ttl: u32,
        /// Seconds to wait for the answer and the receipt
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// Receive messages and receipts as they arrive (and be shown online while running)
    Listen {
        /// Stop after this many messages
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Add a device to your number. On a registered device, with no arguments: show a one-time
    /// link code and wait for the new device. On the new device: `tidings link <number> <code>
    /// --server <url>`
    Link {
        /// The number to join (on the new device)
        number: Option<String>,
        /// The link code shown on the registered device
        code: Option<String>,
        /// The server's URL (on the new device)
        #[arg(long, env = "TIDINGS_SERVER")]
        server: Option<String>,
        /// Trust the server's certificate through this CA file (PEM)
        #[arg(long, conflicts_with = "pin")]
        ca: Option<PathBuf>,
        /// Trust exactly the server certificate with this SHA-256 fingerprint (hex)
        #[arg(long)]
        pin: Option<String>,
        /// Allow plain http:// to a server that is not on this machine
        #[arg(long)]
        insecure: bool,
        /// Seconds the registered device waits for the new one
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// List your number's devices (at most 6), or remove one
    Devices {
        /// Remove the device with this id: its keys and queued messages are deleted
        #[arg(long, value_name = "ID", allow_hyphen_values = true)]
        remove: Option<String>,
    },
    /// Show the safety number to compare with a contact (in person or on a call)
    Fingerprint {
        /// The contact's phone number
        number: String,
    },
    /// Trust a contact's current keys, after comparing safety numbers
    Trust {
        /// The contact's phone number
        number: String,
    },
    /// Show whether numbers are online, offline or not users
    Lookup {
        /// Phone numbers
        #[arg(required = true)]
        numbers: Vec<String>,
    },
    /// Opt out: delete your account, devices, keys and queued messages from the server
    Disable,
    /// Show this profile's state (no network)
    Status,
    /// Show or change how this profile routes messages and sends SMS (no network)
    Settings(Box<SettingsArgs>),
}

/// The flags of `tidings settings`.
#[derive(Debug, clap::Args)]
struct SettingsArgs {
    /// Default route: auto, ip-only, sms-only or queue-then-sms
    #[arg(long, value_parser = ["auto", "ip-only", "sms-only", "queue-then-sms"])]
    route: Option<String>,
    /// For queue-then-sms: how long to wait for delivery over IP, such as 10m
    #[arg(long, value_parser = parse_duration)]
    fallback_after: Option<u64>,
    /// For auto: seconds to wait for the receipt of an accepted message before the SMS
    #[arg(long)]
    receipt_timeout: Option<u64>,
    /// Most SMS parts one message may take
    #[arg(long)]
    max_sms_parts: Option<u8>,
    /// Send fallback SMS as files into this directory (for testing)
    #[arg(long, conflicts_with = "sms_kannel")]
    sms_outbox: Option<PathBuf>,
    /// Send fallback SMS through Kannel's sendsms interface at this URL
    #[arg(long, requires_all = ["sms_username", "sms_password"])]
    sms_kannel: Option<String>,
    /// Kannel sendsms user
    #[arg(long)]
    sms_username: Option<String>,
    /// Kannel or SMPP password
    #[arg(long, env = "TIDINGS_SMS_PASSWORD", hide_env_values = true)]
    sms_password: Option<String>,
    /// Send fallback SMS over SMPP to this SMSC or aggregator, host:port
    #[arg(long, requires_all = ["sms_system_id", "sms_password"], conflicts_with_all = ["sms_outbox", "sms_kannel"])]
    sms_smpp: Option<String>,
    /// SMPP account system_id
    #[arg(long)]
    sms_system_id: Option<String>,
    /// SMPP system_type, if the provider asks for one
    #[arg(long, requires = "sms_smpp")]
    sms_system_type: Option<String>,
    /// SMPP bind: transceiver (receives delivery receipts) or transmitter
    #[arg(long, requires = "sms_smpp", value_parser = ["transceiver", "transmitter"])]
    sms_bind: Option<String>,
    /// How SMPP marks the parts of a long message: udh (most SMSCs) or sar
    #[arg(long, requires = "sms_smpp", value_parser = ["udh", "sar"])]
    sms_concatenation: Option<String>,
    /// Seconds a send waits for the SMSC's delivery receipt (0: none requested)
    #[arg(long, requires = "sms_smpp")]
    sms_receipt_wait: Option<u64>,
    /// Send fallback SMS through a GSM/LTE modem on this serial port, such as /dev/ttyUSB0
    #[arg(long, conflicts_with_all = ["sms_outbox", "sms_kannel", "sms_smpp"])]
    sms_modem: Option<PathBuf>,
    /// The modem's line speed
    #[arg(long, requires = "sms_modem", default_value_t = 115_200)]
    sms_baud: u32,
    /// Seconds the modem may take to send one SMS part
    #[arg(long, requires = "sms_modem", default_value_t = 60)]
    sms_modem_timeout: u64,
    /// Remove the SMS transport
    #[arg(long)]
    no_sms: bool,
}

/// Parses `90`, `90s`, `10m` or `1h` into seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 10m or 1h"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("`{text}` is not a duration such as 90s, 10m or 1h")),
    };
    Ok(value.saturating_mul(factor))
}

fn default_profile() -> PathBuf {
    tidings_server::config::data_home().join("profile")
}

fn init_logging(filter: Option<&str>, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The server's runtime threads: one fewer than the cores (at least one), because the store's
/// writer is a thread of its own that a busy server keeps running. With one runtime thread per
/// core the two kinds took turns on the same cores: on two cores, one runtime thread served the
/// relay with 9-11 % less CPU per message (docs/BENCHMARKS.md, change 22). `None` when
/// `TOKIO_WORKER_THREADS` is set: tokio then takes that count.
fn server_worker_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Some(cores.saturating_sub(1).max(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_server = matches!(cli.command, Command::Server(_));
    init_logging(cli.log.as_deref(), if is_server { "info" } else { "warn" });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if is_server {
        if let Some(threads) = server_worker_threads() {
            builder.worker_threads(threads);
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let not_registered = matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRegistered | ClientError::NotVerified)
            );
            if json {
                println!("{}", json!({ "error": e.to_string() }));
            } else {
                eprintln!("error: {e:#}");
            }
            if not_registered {
                ExitCode::from(EXIT_NOT_REGISTERED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The profile's passphrase: from `--passphrase-file`, else `TIDINGS_PASSPHRASE`, else a prompt
/// on the terminal.
fn passphrase(file: Option<&PathBuf>) -> anyhow::Result<Passphrase> {
    if let Some(file) = file {
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let profile = Profile::at(cli.profile.clone().unwrap_or_else(default_profile));
    let json = cli.json;
    let secret = || passphrase(cli.passphrase_file.as_ref());
    let unlocked = |profile: Profile| -> anyhow::Result<Client> {
        let client = Client::open(profile)?;
        Ok(client.with_passphrase(secret()?))
    };
    match cli.command {
        Command::Server(args) => serve(*args).await,
        Command::Register {
            number,
            server,
            ca,
            pin,
            insecure,
        } => {
            let trust = Trust {
                ca_file: ca,
                pin_sha256: pin,
                insecure,
            };
            let number = client::register(&profile, &number, &server, trust).await?;
            if json {
                println!(
                    "{}",
                    json!({ "status": "code_sent", "number": number.as_str() })
                );
            } else {
                println!(
                    "A code was sent by SMS to {}. Run: tidings verify <code>",
                    number.as_str()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { code } => {
            // Not registered: say so before asking for anything (and touch nothing).
            if profile.load()?.is_none() {
                return Err(ClientError::NotRegistered.into());
            }
            let replaced = client::verify(&profile, &code, &secret()?).await?;
            let client = Client::open(profile)?;
            if json {
                println!(
                    "{}",
                    json!({ "status": "registered", "device_id": client.device().to_text(), "replaced_devices": replaced })
                );
            } else {
                println!("Registered {} on this device.", client.number());
                if replaced > 0 {
                    println!("{replaced} earlier device(s) of this number were signed out.");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Send {
            number,
            text,
            route,
            fallback_after,
            mode,
            ttl,
            wait,
        } => {
            let client = unlocked(profile)?;
            let routing = client.routing().clone();
            // `auto` needs an SMS transport; a profile without one queues over IP instead.
            let route_name = match route {
                Some(route) => route,
                None if routing.route == "auto" && routing.sms.is_none() => "ip-only".to_string(),
                None => routing.route.clone(),
            };
            let route = route::parse_route(
                &route_name,
                fallback_after.unwrap_or(routing.fallback_after_seconds),
            )?;
            if route == Route::IP_QUEUED {
                let mode = match mode {
                    Mode::Queue => SendMode::Queue,
                    Mode::NowOrNever => SendMode::NowOrNever,
                };
                let report = client
                    .send(&number, &text, mode, ttl, Duration::from_secs(wait))
                    .await?;
                print_send(&report, json);
                return Ok(match report.outcome {
                    SendOutcome::Accepted | SendOutcome::Queued => ExitCode::SUCCESS,
                    _ => ExitCode::from(EXIT_NOT_TAKEN),
                });
            }
            let status = client
                .send_routed(&number, &text, route, Duration::from_secs(wait))
                .await?;
            Ok(print_routed(&route_name, &status, json))
        }
        Command::Listen { count, timeout } => {
            let client = unlocked(profile)?;
            let until = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
            let mut shown = 0usize;
            let own = client.number().to_string();
            client
                .listen(until, |event| {
                    print_event(&event, json, &own);
                    if matches!(event, Event::Message(_)) {
                        shown += 1;
                    }
                    count.is_none_or(|count| shown < count)
                })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Link {
            number,
            code,
            server,
            ca,
            pin,
            insecure,
            wait,
        } => match (number, code) {
            (None, None) => {
                let client = unlocked(profile)?;
                let joined = client
                    .approve_link(
                        |code, expires_in| {
                            if json {
                                println!(
                                    "{}",
                                    json!({ "status": "code", "code": code, "expires_in": expires_in })
                                );
                            } else {
                                println!(
                                    "On the new device run:\n  tidings link {} {code} --server <url>\nThe code is valid for {} minutes and works once. Waiting...",
                                    client.number(),
                                    expires_in / 60
                                );
                            }
                            use std::io::Write as _;
                            let _ = std::io::stdout().flush();
                        },
                        Duration::from_secs(wait),
                    )
                    .await?;
                match joined {
                    Some(device) if json => {
                        println!("{}", json!({ "status": "linked", "device_id": device.to_text() }))
                    }
                    Some(device) => println!("Device {device} joined this number."),
                    None => anyhow::bail!("no device joined in time: run `tidings link` again for a new code"),
                }
                Ok(ExitCode::SUCCESS)
            }
            (Some(number), Some(code)) => {
                let Some(server) = server else {
                    anyhow::bail!("the new device needs the server: add --server <url>");
                };
                let trust = Trust {
                    ca_file: ca,
                    pin_sha256: pin,
                    insecure,
                };
                let device =
                    client::link(&profile, &number, &code, &server, trust, &secret()?).await?;
                if json {
                    println!("{}", json!({ "status": "linked", "device_id": device.to_text() }));
                } else {
                    println!("This device joined {number}; the number's other devices stay signed in.");
                }
                Ok(ExitCode::SUCCESS)
            }
            _ => anyhow::bail!(
                "give both the number and the link code (new device), or neither (registered device)"
            ),
        },
        Command::Devices { remove } => {
            let client = Client::open(profile)?;
            if let Some(id) = remove {
                let Some(device) = DeviceId::from_text(&id) else {
                    anyhow::bail!("that is not a device id: copy one from `tidings devices`");
                };
                client.remove_device(device).await?;
                if json {
                    println!("{}", json!({ "status": "removed", "device_id": device.to_text() }));
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
                if json {
                    println!(
                        "{}",
                        json!({ "device_id": device.id.to_text(), "identity_key": key, "this_device": device.this_device })
                    );
                } else {
                    let this = if device.this_device { "\t(this device)" } else { "" };
                    println!("{}\t{key}{this}", device.id);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fingerprint { number } => {
            let client = unlocked(profile)?;
            let print = client.fingerprint(&number).await?;
            let status = if !print.known {
                "not yet trusted (trusted on first message)"
            } else if print.untrusted > 0 {
                "CHANGED: keys you have not trusted; compare, then `tidings trust`"
            } else {
                "trusted"
            };
            if json {
                println!(
                    "{}",
                    json!({
                        "number": print.number,
                        "safety_number": print.safety_number,
                        "devices": print.devices,
                        "untrusted_keys": print.untrusted,
                        "known": print.known,
                    })
                );
            } else {
                println!(
                    "Safety number with {} ({} device(s), {status}):\n  {}\nCompare it with theirs; equal means nobody is in between.",
                    print.number, print.devices, print.safety_number
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Trust { number } => {
            let client = unlocked(profile)?;
            let keys = client.trust(&number).await?;
            if json {
                println!("{}", json!({ "status": "trusted", "keys": keys }));
            } else {
                println!("Trusted the {keys} current key(s) of {number}.");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lookup { numbers } => {
            let client = Client::open(profile)?;
            for (number, presence) in client.lookup(&numbers).await? {
                if json {
                    println!(
                        "{}",
                        json!({ "number": number, "presence": presence.as_str() })
                    );
                } else {
                    println!("{number}\t{}", presence.as_str().replace('_', " "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Disable => {
            let client = Client::open(profile)?;
            client.disable().await?;
            if json {
                println!("{}", json!({ "status": "disabled" }));
            } else {
                println!(
                    "Disabled. The server deleted your account, devices, keys and queued messages."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Settings(settings) => {
            let SettingsArgs {
                route,
                fallback_after,
                receipt_timeout,
                max_sms_parts,
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
            } = *settings;
            let mut data = profile.load()?.ok_or(ClientError::NotRegistered)?;
            let routing = &mut data.routing;
            if let Some(route) = route {
                routing.route = route;
            }
            if let Some(seconds) = fallback_after {
                routing.fallback_after_seconds = seconds;
            }
            if let Some(seconds) = receipt_timeout {
                routing.receipt_timeout_seconds = seconds;
            }
            if let Some(parts) = max_sms_parts {
                routing.max_sms_parts = parts.max(1);
            }
            if let Some(dir) = sms_outbox {
                routing.sms = Some(TransportConfig::Outbox { dir });
            }
            if let (Some(address), Some(system_id), Some(password)) =
                (sms_smpp, sms_system_id, sms_password.clone())
            {
                routing.sms = Some(TransportConfig::Smpp(SmppConfig {
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
                    enquire_link_seconds: 30,
                    receipt_wait_seconds: sms_receipt_wait.unwrap_or(0),
                }));
            }
            if let Some(port) = sms_modem {
                routing.sms = Some(TransportConfig::Modem(ModemConfig {
                    port,
                    baud: sms_baud,
                    timeout_seconds: sms_modem_timeout,
                }));
            }
            if let (Some(url), Some(username), Some(password)) =
                (sms_kannel, sms_username, sms_password)
            {
                routing.sms = Some(TransportConfig::Kannel {
                    url,
                    username,
                    password,
                });
            }
            if no_sms {
                routing.sms = None;
            }
            profile.save(&data)?;
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
            if json {
                println!(
                    "{}",
                    json!({
                        "route": routing.route,
                        "fallback_after_seconds": routing.fallback_after_seconds,
                        "receipt_timeout_seconds": routing.receipt_timeout_seconds,
                        "max_sms_parts": routing.max_sms_parts,
                        "sms": sms,
                    })
                );
            } else {
                println!(
                    "route {}; fallback after {} s; receipt timeout {} s; at most {} SMS parts; SMS transport: {sms}",
                    routing.route, routing.fallback_after_seconds, routing.receipt_timeout_seconds, routing.max_sms_parts
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let data = profile.load()?;
            let registered = data.is_some();
            let verified = data.as_ref().is_some_and(|d| d.device_id.is_some());
            if json {
                println!(
                    "{}",
                    json!({
                        "registered": registered,
                        "verified": verified,
                        "number": data.as_ref().map(|d| d.number.clone()),
                        "server": data.as_ref().map(|d| d.server.clone()),
                    })
                );
            } else if let Some(data) = data {
                let state = if verified {
                    "registered"
                } else {
                    "waiting for `tidings verify <code>`"
                };
                println!("{} at {}: {state}", data.number, data.server);
            } else {
                println!(
                    "Not registered: nothing is sent anywhere until you run `tidings register`."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_send(report: &SendReport, json: bool) {
    let receipt = report.receipt.map(|kind| match kind {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Expired => "expired",
    });
    if json {
        println!(
            "{}",
            json!({ "id": report.id.to_text(), "outcome": report.outcome.as_str(), "receipt": receipt, "copies": report.copies })
        );
        return;
    }
    let text = match (report.outcome, receipt) {
        (SendOutcome::Accepted, Some("delivered")) => "delivered",
        (SendOutcome::Accepted, _) => {
            "accepted: a device of the receiver is online; no receipt yet"
        }
        (SendOutcome::Queued, _) => "queued: it will be delivered when the receiver comes online",
        (SendOutcome::RefusedNotReachable, _) => {
            "not sent: the receiver is not online now (nothing was stored)"
        }
        (SendOutcome::NotAUser, _) => "not sent: that number does not use Tidings",
        (SendOutcome::RefusedQueueFull, _) => "not sent: the receiver's queue is full",
        (SendOutcome::RateLimited, _) => "not sent: too many messages, slow down",
        (SendOutcome::Invalid, _) => "not sent: the server found the message invalid",
        (SendOutcome::Unavailable, _) => "not sent: the server could not store it now; try again",
        (SendOutcome::DevicesChanged, _) => {
            "not sent: the receiver's devices changed while sending; try again"
        }
    };
    println!("{text}");
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
            Some(refused) => format!("not sent: {}", refused.replace('_', " ")),
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
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

async fn serve(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    let server = tidings_server::Server::bind(config).await?;
    let address = server.local_addr()?;
    let scheme = if server_tls(&args) { "https" } else { "http" };
    println!("tidings server listening on {scheme}://{address}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received");
        signal.cancel();
    });
    server.run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn server_tls(args: &ServerArgs) -> bool {
    args.resolve().map(|c| c.tls.is_some()).unwrap_or(false)
}

/// jemalloc, for the Rust code and (its `malloc` unprefixed) for SQLite's C code: sizes kept
/// apart in slabs, and freed pages given back by its background thread (settings in
/// `.cargo/config.toml`). Why: docs/ARCHITECTURE.md, dependencies.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
