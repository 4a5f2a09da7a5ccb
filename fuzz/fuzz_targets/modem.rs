//! What a modem answers on its serial port, as the modem transport reads it (final answers,
//! `+CMS ERROR` codes, the `>` prompt). The first byte picks prompt mode and where the input is
//! cut into two reads. Checks that no input panics and, outside prompt mode (where a `>` with no
//! line end is the answer, so the cut matters), that the answers do not depend on the cut. The
//! input's lines are also read as an `AT+CMGL=4` listing of received messages.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_gateway::fuzzing::{modem_answers, modem_listing};

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let prompt = first & 1 == 1;
    let cut = usize::from(first >> 1).min(input.len());
    let (head, tail) = input.split_at(cut);
    let whole = modem_answers(&[input], prompt);
    // The same bytes as the lines of an `AT+CMGL=4` answer, read as received messages.
    let lines: Vec<String> = String::from_utf8_lossy(input)
        .lines()
        .map(str::to_string)
        .collect();
    let _ = modem_listing(&lines);
    let split = modem_answers(&[head, tail], prompt);
    if !prompt {
        assert_eq!(
            split, whole,
            "the answers depend on how reads cut the input"
        );
    }
});
