#!/usr/bin/env bash
# Runs every fuzz target for a bounded time ($1 seconds each, default 30) and fails on any crash.
# cargo-fuzz needs nightly-only rustc flags; the machine has only stable rustc, which accepts them
# with RUSTC_BOOTSTRAP=1. Without a sanitizer the fuzzer catches panics, aborts and hangs (the
# parsers are safe Rust; the JPEG decoder is libjpeg-turbo's C, which it exercises for crashes).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-30}"
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --version =0.13.2 --locked
fi
export RUSTC_BOOTSTRAP=1
mkdir -p corpus/text_parser corpus/binary_decoder corpus/image_decoder
# Seeds: valid and near-valid inputs so the fuzzer starts inside the grammar.
printf '[1,2.5,-3e-2]' > corpus/text_parser/seed1
printf ' [ 1e-05 , 3.4028235e+38 ]\n' > corpus/text_parser/seed2
printf '[1,,2]' > corpus/text_parser/seed3
printf '\x00\x02\x00\x00\x3f\x80\x00\x00\xc0\x00\x00\x00' > corpus/binary_decoder/seed1
# Small committed images of every format and layout seed the image decoder.
find ../tests/fixtures/reference/images -type f -size -20k -exec cp {} corpus/image_decoder/ \;
for target in text_parser binary_decoder image_decoder; do
    echo "fuzz: $target for ${SECONDS_EACH}s"
    cargo fuzz run --sanitizer none --release "$target" "corpus/$target" -- \
        -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -print_final_stats=1 2>&1 | tail -n 4
    # cargo fuzz exits non-zero on a crash; pipefail propagates it.
done
echo "fuzz: no crashes"
