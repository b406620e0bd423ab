//! The text parser must never panic, and whatever it accepts must print and re-parse to the
//! same bits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rsclip_core::text;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = text::parse(data) {
        assert!(!values.is_empty() && values.len() <= rsclip_core::MAX_DIMS);
        assert!(values.iter().all(|v| v.is_finite()));
        let printed = text::format(&values);
        let again = text::parse(printed.as_bytes()).expect("printed form must parse");
        assert_eq!(
            again.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
});
