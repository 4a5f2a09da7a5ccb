//! The base64url text form of binary values: keys and signatures in HTTP bodies, the login
//! challenge header the client reads, device ids in answers (`tidings_proto::id`). Checks that
//! no input panics, that decoded bytes encode to text that decodes to the same bytes, and that
//! the fixed-size ids take exactly their length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_proto::id::{self, DeviceId, MessageId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(bytes) = id::from_text(text) else {
        assert!(DeviceId::from_text(text).is_none());
        return;
    };
    assert_eq!(id::from_text(&id::to_text(&bytes)).as_ref(), Some(&bytes));
    let device = DeviceId::from_text(text);
    assert_eq!(device.is_some(), bytes.len() == DeviceId::LEN);
    if let Some(device) = device {
        assert_eq!(DeviceId::from_text(&device.to_text()), Some(device));
    }
    assert_eq!(
        MessageId::from_text(text).is_some(),
        bytes.len() == MessageId::LEN
    );
});
