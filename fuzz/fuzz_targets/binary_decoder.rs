//! The binary decoder must never panic or read past its input, and must round-trip what it accepts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rsclip_core::binary;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = binary::decode(data) {
        let mut out = Vec::new();
        binary::encode(&values, &mut out);
        assert_eq!(out.as_slice(), data);
    }
});
