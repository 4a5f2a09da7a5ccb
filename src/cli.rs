//! The command line: every flag, its help text and the exit codes. Parsing only; the commands
//! are in `commands.rs`, the defaults they show come from `tidings_client::defaults`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tidings_client::defaults;
use tidings_client::profile::Trust;
use tidings_server::config::ServerArgs;

/// Exit code: the message was not taken (not a user, not reachable, refused, rate-limited).
pub const EXIT_NOT_TAKEN: u8 = 3;
/// Exit code: the profile is not registered, so nothing was sent anywhere.
pub const EXIT_NOT_REGISTERED: u8 = 4;
/// Exit code: not through yet (not settled on the server, SMS gateway down, server unreachable
/// for a withdraw, a delayed fallback waiting); kept in the profile and carried on by
/// `tidings listen`.
pub const EXIT_PENDING: u8 = 5;

#[derive(Debug, Parser)]
#[command(
    name = "tidings",
    version,
    about = "Opt-in phone-number messaging over IP",
    long_about = "Tidings sends text messages over IP between people identified by phone number.\n\
        Nothing leaves this machine until you register; contacts' numbers reach the server only\n\
        blinded; disabling deletes everything the server had.\n\n\
        Start a server:        tidings server\n\
        Opt in:                tidings register +4915112345678 --server http://127.0.0.1:7433\n\
                               tidings verify 123456\n\
        Or by your own SMS:    tidings register +4915112345678 --server URL --by-own-sms\n\
        Who can I reach?       tidings lookup +4915187654321\n\
        Send and receive:      tidings send +4915187654321 'Hello'   /   tidings listen\n\
        Check who it is:       tidings fingerprint +4915187654321\n\
        Another device:        tidings link   (on this one)   /   tidings link <number> <link string> --server <url>\n\
        Opt out:               tidings disable\n\n\
        Keys and messages in the profile are encrypted under a passphrase: from --passphrase-file,\n\
        else TIDINGS_PASSPHRASE, else a prompt.",
    after_help = "Exit codes: 0 done; 1 failed (see the message); 2 bad usage; 3 the message was not taken\n\
        (not a user, not reachable, queue full, rate-limited); 4 this profile is not registered;\n\
        5 not through yet (not settled, or a fallback pending): kept, and carried on while\n\
        `tidings listen` runs."
)]
pub struct Cli {
    /// Profile directory: one per user of this machine [default: $XDG_DATA_HOME/tidings/profile]
    #[arg(long, env = "TIDINGS_PROFILE", global = true)]
    pub profile: Option<PathBuf>,
    /// Print results as JSON (one object per line)
    #[arg(long, global = true)]
    pub json: bool,
    /// Log filter, such as `info` or `tidings_server=debug` [default: info for the server, warn otherwise]
    #[arg(long, env = "TIDINGS_LOG", global = true)]
    pub log: Option<String>,
    /// Read the profile's passphrase from this file (else TIDINGS_PASSPHRASE, else a prompt)
    #[arg(long, env = "TIDINGS_PASSPHRASE_FILE", global = true)]
    pub passphrase_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Mode {
    /// Keep it on the server until a device of the receiver takes it, or until its TTL ends
    Queue,
    /// Only if a device of the receiver is online now; otherwise nothing is stored
    NowOrNever,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (embedded storage; see docs/CONFIGURATION.md), or rotate its OPRF key
    Server(Box<ServerCommand>),
    /// Opt in: save the server in this profile and have a code sent to your number by SMS (or,
    /// with --by-own-sms, text one from your phone)
    Register(RegisterArgs),
    /// Finish opting in with the 6-digit code from the SMS
    Verify {
        /// The code
        code: String,
    },
    /// Send a text message
    Send(SendArgs),
    /// Receive messages and receipts as they arrive (and be shown online while running). A lost
    /// connection is made again (after 0.5 s, doubling up to 30 s), said on stderr
    Listen {
        /// Stop after this many messages
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Add a device to your number. On a registered device, with no arguments: show a one-time
    /// link string (and its QR code) and wait for the new device; a device that joins without
    /// proving the string's secret is refused and removed. On the new device: `tidings link
    /// <number> <link string> --server <url>`
    Link(LinkArgs),
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
    /// Pin the server's discovery key again, after its operator announced a new one (contacts'
    /// pseudonyms are derived again when next needed)
    Repin,
    /// Opt out: delete your account, devices, keys and queued messages from the server
    Disable,
    /// Show this profile's state (no network)
    Status,
    /// List the messages this profile keeps (no network): those received, each with whether it
    /// was shown, and those sent, each with where its route stands
    History,
    /// Show or change how this profile routes messages and sends SMS (no network), or publish a
    /// new contact token (--rotate-contact-token)
    Settings(Box<SettingsArgs>),
}

/// The flags of `tidings register`.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// Your phone number in international form, such as +4915112345678
    pub number: String,
    /// The server's URL, such as https://tidings.example:7433; several addresses of the same
    /// service separated by commas are tried in turn
    #[arg(long, env = "TIDINGS_SERVER")]
    pub server: String,
    /// Prove the number with an SMS you send (shown here) instead of a code the server sends;
    /// waits until the server has it, then finishes like `verify`
    #[arg(long)]
    pub by_own_sms: bool,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// The flags of `tidings send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The receiver's phone number
    pub number: String,
    /// The text
    pub text: String,
    /// Route: auto (IP if the receiver is online, else SMS), ip-only, sms-only, or
    /// queue-then-sms (IP, then SMS if undelivered after --fallback-after) [default: the
    /// profile's; auto needs an SMS transport, without one messages queue over IP]
    #[arg(long, value_parser = ["auto", "ip-only", "sms-only", "queue-then-sms"])]
    pub route: Option<String>,
    /// For queue-then-sms: how long to wait for delivery over IP, such as 90s, 10m or 1h
    #[arg(long, value_parser = parse_duration)]
    pub fallback_after: Option<u64>,
    /// For ip-only: keep the message until delivered (queue), or only if a device is online now
    #[arg(long, value_enum, default_value_t = Mode::Queue)]
    pub mode: Mode,
    /// Seconds a queued message is kept (0: the server's default, 7 days; the server refuses more than 30 days, 2592000)
    #[arg(long, default_value_t = defaults::SEND_TTL_SECONDS)]
    pub ttl: u32,
    /// Seconds to wait for the answer and the receipt
    #[arg(long, default_value_t = defaults::SEND_WAIT_SECONDS)]
    pub wait: u64,
}

/// The flags of `tidings link`.
#[derive(Debug, clap::Args)]
pub struct LinkArgs {
    /// The number to join (on the new device)
    pub number: Option<String>,
    /// The whole link string shown on the registered device (its code and secret)
    #[arg(value_name = "LINK_STRING")]
    pub code: Option<String>,
    /// The server's URL (on the new device); several addresses separated by commas are tried
    /// in turn
    #[arg(long, env = "TIDINGS_SERVER")]
    pub server: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Seconds the registered device waits for the new one
    #[arg(long, default_value_t = defaults::LINK_WAIT_SECONDS)]
    pub wait: u64,
}

/// `tidings server`: run it, or one of the operator's key commands.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerCommand {
    #[command(subcommand)]
    pub action: Option<ServerAction>,
    #[command(flatten)]
    pub args: ServerArgs,
}

/// The operator's commands on the server's key file. Each takes effect at the server's next
/// start (docs/CONFIGURATION.md, "Rotating the discovery key").
#[derive(Debug, Subcommand)]
pub enum ServerAction {
    /// Make a new discovery (OPRF) key; the current one becomes the previous one, still used for
    /// accounts not yet moved, until `retire-oprf-key`
    RotateOprfKey {
        /// The key file [default: the server's, as `tidings server` resolves it]
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Drop the previous discovery key (once `tidings_accounts_on_previous_oprf_key` is 0)
    RetireOprfKey {
        /// The key file [default: the server's, as `tidings server` resolves it]
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

/// How to trust the server, for `register` and `link`.
#[derive(Debug, clap::Args)]
pub struct TrustArgs {
    /// Trust the server's certificate through this CA file (PEM)
    #[arg(long, conflicts_with = "pin")]
    pub ca: Option<PathBuf>,
    /// Trust exactly the server certificate with this SHA-256 fingerprint (hex)
    #[arg(long)]
    pub pin: Option<String>,
    /// Allow plain http:// to a server that is not on this machine
    #[arg(long)]
    pub insecure: bool,
}

impl TrustArgs {
    /// What the profile stores of these flags.
    pub fn into_trust(self) -> Trust {
        Trust {
            ca_file: self.ca,
            pin_sha256: self.pin,
            insecure: self.insecure,
        }
    }
}

/// The flags of `tidings settings`.
#[derive(Debug, clap::Args)]
pub struct SettingsArgs {
    /// Who may see this device online: contacts (those it wrote to), everyone (who knows the
    /// number) or nobody. A change makes a new presence key, as --presence-rotate does
    #[arg(long, value_parser = ["contacts", "everyone", "nobody"])]
    pub presence: Option<String>,
    /// Make a new presence key: nobody who could see this device online can until it writes to
    /// them again
    #[arg(long)]
    pub presence_rotate: bool,
    /// Default route: auto, ip-only, sms-only or queue-then-sms
    #[arg(long, value_parser = ["auto", "ip-only", "sms-only", "queue-then-sms"])]
    pub route: Option<String>,
    /// For queue-then-sms: how long to wait for delivery over IP, such as 10m
    #[arg(long, value_parser = parse_duration)]
    pub fallback_after: Option<u64>,
    /// For auto: seconds to wait for the receipt of an accepted message before the SMS
    #[arg(long)]
    pub receipt_timeout: Option<u64>,
    /// Most SMS parts one message may take
    #[arg(long)]
    pub max_sms_parts: Option<u8>,
    /// Send fallback SMS as files into this directory (for testing)
    #[arg(long, conflicts_with = "sms_kannel")]
    pub sms_outbox: Option<PathBuf>,
    /// Send fallback SMS through Kannel's sendsms interface at this URL
    #[arg(long, requires_all = ["sms_username", "sms_password"])]
    pub sms_kannel: Option<String>,
    /// Kannel sendsms user
    #[arg(long)]
    pub sms_username: Option<String>,
    /// Kannel or SMPP password
    #[arg(long, env = "TIDINGS_SMS_PASSWORD", hide_env_values = true)]
    pub sms_password: Option<String>,
    /// Send fallback SMS over SMPP to this SMSC or aggregator, host:port
    #[arg(long, requires_all = ["sms_system_id", "sms_password"], conflicts_with_all = ["sms_outbox", "sms_kannel"])]
    pub sms_smpp: Option<String>,
    /// SMPP account system_id
    #[arg(long)]
    pub sms_system_id: Option<String>,
    /// SMPP system_type, if the provider asks for one
    #[arg(long, requires = "sms_smpp")]
    pub sms_system_type: Option<String>,
    /// SMPP bind: transceiver (receives delivery receipts) or transmitter
    #[arg(long, requires = "sms_smpp", value_parser = ["transceiver", "transmitter"])]
    pub sms_bind: Option<String>,
    /// How SMPP marks the parts of a long message: udh (most SMSCs) or sar
    #[arg(long, requires = "sms_smpp", value_parser = ["udh", "sar"])]
    pub sms_concatenation: Option<String>,
    /// Seconds a send waits for the SMSC's delivery receipt (0: none requested)
    #[arg(long, requires = "sms_smpp")]
    pub sms_receipt_wait: Option<u64>,
    /// Send fallback SMS through a GSM/LTE modem on this serial port, such as /dev/ttyUSB0
    #[arg(long, conflicts_with_all = ["sms_outbox", "sms_kannel", "sms_smpp"])]
    pub sms_modem: Option<PathBuf>,
    /// The modem's line speed
    #[arg(long, requires = "sms_modem", default_value_t = defaults::MODEM_BAUD)]
    pub sms_baud: u32,
    /// Seconds the modem may take to send one SMS part
    #[arg(long, requires = "sms_modem", default_value_t = defaults::MODEM_TIMEOUT_SECONDS)]
    pub sms_modem_timeout: u64,
    /// Remove the SMS transport
    #[arg(long)]
    pub no_sms: bool,
    /// Make a new contact token and publish its hash (needs the server and the passphrase).
    /// Everyone this device wrote to is then a stranger here (few messages kept, for 3 days)
    /// until it writes to them again
    #[arg(long)]
    pub rotate_contact_token: bool,
}

/// Parses `90`, `90s`, `10m` or `1h` into seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
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
