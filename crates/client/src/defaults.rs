//! Every default a client starts from, in one place: the command line shows them in its help
//! and fills its flags from them, and apps embedding the crate use the same ones. Nothing here
//! touches the network or the profile; it only reads the environment for the profile directory.

use std::path::PathBuf;

/// The profile directory when none is given: `$XDG_DATA_HOME/tidings/profile`, else
/// `~/.local/share/tidings/profile` (the server keeps its data beside it, in `tidings/`).
pub fn profile_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"))
                .join(".local/share")
        })
        .join("tidings")
        .join("profile")
}

/// Seconds `send` waits for the server's answer and the receipt.
pub const SEND_WAIT_SECONDS: u64 = 10;
/// Seconds a queued message is kept; 0 leaves it to the server (7 days by default).
pub const SEND_TTL_SECONDS: u32 = 0;
/// Seconds a registered device waits for a new one to join with its link code.
pub const LINK_WAIT_SECONDS: u64 = 600;

/// The route of a profile that never chose one (`auto` needs an SMS transport; without one,
/// messages queue over IP).
pub const ROUTE: &str = "auto";
/// For `queue-then-sms`: seconds before an undelivered message is withdrawn and sent as SMS.
pub const FALLBACK_AFTER_SECONDS: u64 = 600;
/// For `auto`: seconds to wait for the receipt of an accepted message before falling back.
pub const RECEIPT_TIMEOUT_SECONDS: u64 = 5;
/// Most SMS parts one fallback message may take.
pub const MAX_SMS_PARTS: u8 = 10;

/// A GSM modem's line speed.
pub const MODEM_BAUD: u32 = 115_200;
/// Seconds a modem may take to send one SMS part.
pub const MODEM_TIMEOUT_SECONDS: u64 = 60;
/// Seconds between SMPP keep-alives (`enquire_link`).
pub const SMPP_ENQUIRE_LINK_SECONDS: u64 = 30;

#[cfg(test)]
mod tests {
    #[test]
    fn the_profile_directory_follows_xdg_data_home() {
        // Read, not set: tests run in parallel and share the environment.
        let dir = super::profile_dir();
        assert!(dir.ends_with("tidings/profile"), "{}", dir.display());
        if let Some(data_home) = std::env::var_os("XDG_DATA_HOME") {
            assert!(dir.starts_with(data_home));
        }
    }
}
