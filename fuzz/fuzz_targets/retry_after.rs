#![no_main]
//! See `pushgate::fuzzing` for the input format and the properties asserted.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pushgate::fuzzing::provider::retry_after(data));
