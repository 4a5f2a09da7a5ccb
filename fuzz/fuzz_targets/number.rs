//! Phone numbers as they arrive in HTTP bodies and frames (`E164::parse`). Checks that no input
//! panics, that a parsed number is `+` and digits that the SMS encoder can address (the
//! numbering plans allow more than E.164's 15 digits: `+4951176441375878` is valid), that
//! parsing it again gives itself, and that its `Debug` form does not show it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_proto::number::E164;
use tidings_sms::SubmitOptions;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(number) = E164::parse(text) {
        let digits = number
            .as_str()
            .strip_prefix('+')
            .expect("E.164 starts with +");
        assert!(digits.bytes().all(|b| b.is_ascii_digit()), "{digits}");
        // Codes go to every number the server accepts, and fallback SMS to every number a
        // client accepts.
        assert!(
            tidings_sms::encode_submit(number.as_str(), "x", &SubmitOptions::default()).is_ok(),
            "{digits}"
        );
        assert_eq!(E164::parse(number.as_str()).as_ref(), Ok(&number));
        assert!(!format!("{number:?}").contains(digits));
    }
});
