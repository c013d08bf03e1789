//! Arbitrary backend bytes, in arbitrary chunks, through the response parser:
//! it never panics and keeps its contract (see `protocol::invariants`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| guard::protocol::invariants::fuzz_one(data, true));
