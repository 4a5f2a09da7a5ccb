//! Where verification codes leave the server as SMS.
//!
//! This is the one place a number is handled in clear after parsing: the gateway must know where
//! to send. Nothing here logs it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use tidings_proto::number::E164;

/// An SMS gateway for verification codes.
#[derive(Debug)]
pub enum Gateway {
    /// Writes each SMS to `<dir>/<time>-<n>.json` as `{"to": ..., "text": ...}`, atomically.
    Outbox { dir: PathBuf, counter: AtomicU64 },
}

impl Gateway {
    /// An outbox gateway writing into `dir`.
    pub fn outbox(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create outbox {}", dir.display()))?;
        Ok(Gateway::Outbox {
            dir,
            counter: AtomicU64::new(0),
        })
    }

    /// Sends one SMS.
    pub async fn send(&self, to: &E164, text: &str) -> anyhow::Result<()> {
        match self {
            Gateway::Outbox { dir, counter } => {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let name = format!("{stamp}-{}-{n}.json", std::process::id());
                let body = serde_json::json!({ "to": to.as_str(), "text": text }).to_string();
                let temp = dir.join(format!(".{name}.tmp"));
                tokio::fs::write(&temp, body)
                    .await
                    .context("outbox write failed")?;
                tokio::fs::rename(&temp, dir.join(&name))
                    .await
                    .context("outbox rename failed")?;
                Ok(())
            }
        }
    }
}
