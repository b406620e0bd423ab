//! Any bytes through the image decoders (PNG, JPEG via libjpeg-turbo, WebP, TIFF incl. multi-band)
//! and preprocessing: an error is fine, a panic, abort or hang is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rsclip_model::decode::{decode_rgb8, DecodeOptions};

fuzz_target!(|data: &[u8]| {
    // decode_rgb8 turns third-party decoder panics into errors; keep libfuzzer's abort-on-panic
    // hook from firing for those. A panic that escapes still aborts (libfuzzer-sys checks).
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    for reduce_to in [None, Some(16)] {
        let opts = DecodeOptions {
            max_pixels: 1 << 22,
            reduce_to,
            ..DecodeOptions::default()
        };
        if let Ok(img) = decode_rgb8(data, &opts) {
            assert_eq!(img.data.len(), img.width * img.height * 3);
        }
    }
});
