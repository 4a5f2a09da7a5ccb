//! Where verification codes leave the server as SMS, and where SMS from phones are read (SMPP,
//! modem): a thin layer over `tidings-gateway`.
//!
//! This is the one place a number is handled in clear after parsing: the gateway must know where
//! to send. Nothing here logs it.

use tidings_gateway::{Received, SendError, Sms, Transport, TransportConfig};
use tidings_proto::number::E164;

/// A code is one SMS part; longer texts are refused before they reach the gateway.
const CODE_PARTS: u8 = 1;

/// The gateway for verification codes.
#[derive(Debug)]
pub struct Gateway {
    transport: Transport,
    from: String,
}

impl Gateway {
    /// A gateway sending with `config`, signed `from`.
    pub fn new(config: TransportConfig, from: String) -> Self {
        Self {
            transport: Transport::new(config, CODE_PARTS),
            from,
        }
    }

    /// Sends one SMS.
    pub async fn send(&self, to: &E164, text: &str) -> Result<(), SendError> {
        let sms = Sms {
            from: self.from.clone(),
            to: to.as_str().to_string(),
            text: text.to_string(),
        };
        self.transport.send(&sms).await.map(|_| ())
    }

    /// The SMS phones sent to the service since the last call (SMPP and modem only).
    pub async fn receive(&self) -> Result<Vec<Received>, SendError> {
        self.transport.receive().await
    }
}
