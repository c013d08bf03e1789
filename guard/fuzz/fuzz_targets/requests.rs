//! Arbitrary client bytes, in arbitrary chunks, through the request parser:
//! it never panics and keeps its contract (see `protocol::invariants`).
#![no_main]

use guard::protocol::{Limits, invariants::drive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    // Small limits reach the over-limit paths with small inputs too.
    let small = Limits {
        max_key_len: 16,
        max_value_len: 64,
        max_line_len: 96,
        max_retrieval_line_len: 160,
        max_keys_per_get: 4,
        ..Limits::default()
    };
    for limits in [Limits::default(), small] {
        if let Err(e) = drive(input, usize::from(chunk) + 1, &limits, false) {
            panic!("{e}");
        }
    }
});
