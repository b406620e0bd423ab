//! Binary (COPY BINARY / send-recv) format of `embedding`, the same bytes as pgvector's `vector`:
//! `u16` dimension count, `u16` reserved (zero), then each element as a big-endian IEEE `f32`.

use crate::{check_dims, ShapeError};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than the 4 header bytes.
    TruncatedHeader(usize),
    Shape(ShapeError),
    ReservedNotZero(u16),
    /// The header's dimension count does not match the bytes that follow it.
    LengthMismatch {
        dims: usize,
        payload_bytes: usize,
    },
    NotFinite {
        index: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TruncatedHeader(n) => {
                write!(f, "binary embedding needs a 4-byte header, got {n} bytes")
            }
            DecodeError::Shape(e) => write!(f, "{e}"),
            DecodeError::ReservedNotZero(v) => {
                write!(f, "binary embedding has unknown flags {v:#06x} in its header")
            }
            DecodeError::LengthMismatch { dims, payload_bytes } => write!(
                f,
                "binary embedding header says {dims} dimensions ({} bytes) but {payload_bytes} bytes follow",
                dims * 4
            ),
            DecodeError::NotFinite { index } => {
                write!(f, "binary embedding element {} is NaN or infinite", index + 1)
            }
        }
    }
}

pub const HEADER_BYTES: usize = 4;

/// Decodes one value that occupies all of `buf`. Reads nothing past `buf`, whatever the header says.
pub fn decode(buf: &[u8]) -> Result<Vec<f32>, DecodeError> {
    if buf.len() < HEADER_BYTES {
        return Err(DecodeError::TruncatedHeader(buf.len()));
    }
    let dims = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    let reserved = u16::from_be_bytes([buf[2], buf[3]]);
    check_dims(dims).map_err(DecodeError::Shape)?;
    if reserved != 0 {
        return Err(DecodeError::ReservedNotZero(reserved));
    }
    let payload = &buf[HEADER_BYTES..];
    if payload.len() != dims * 4 {
        return Err(DecodeError::LengthMismatch {
            dims,
            payload_bytes: payload.len(),
        });
    }
    let mut out = Vec::with_capacity(dims);
    for (index, chunk) in payload.chunks_exact(4).enumerate() {
        let v = f32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if !v.is_finite() {
            return Err(DecodeError::NotFinite { index });
        }
        out.push(v);
    }
    Ok(out)
}

/// Encodes `values` (at most `MAX_DIMS`, which fits the `u16` header).
pub fn encode(values: &[f32], out: &mut Vec<u8>) {
    debug_assert!(check_dims(values.len()).is_ok());
    out.reserve(HEADER_BYTES + values.len() * 4);
    out.extend_from_slice(&(values.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_DIMS;
    use proptest::prelude::*;

    #[test]
    fn known_bytes() {
        let mut out = Vec::new();
        encode(&[1.0, -2.0], &mut out);
        assert_eq!(out, [0, 2, 0, 0, 0x3f, 0x80, 0, 0, 0xc0, 0, 0, 0]);
        assert_eq!(decode(&out).unwrap(), vec![1.0, -2.0]);
    }

    #[test]
    fn lying_headers_are_rejected() {
        assert_eq!(decode(&[0, 1]), Err(DecodeError::TruncatedHeader(2)));
        assert_eq!(
            decode(&[0, 0, 0, 0]),
            Err(DecodeError::Shape(ShapeError::Empty))
        );
        // Claims 3 dimensions, carries 1.
        assert_eq!(
            decode(&[0, 3, 0, 0, 0x3f, 0x80, 0, 0]),
            Err(DecodeError::LengthMismatch {
                dims: 3,
                payload_bytes: 4
            })
        );
        // Claims 1, carries 2.
        assert!(matches!(
            decode(&[0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::LengthMismatch { .. })
        ));
        assert_eq!(
            decode(&[0xff, 0xff, 0, 0]),
            Err(DecodeError::Shape(ShapeError::TooManyDims(65535)))
        );
        assert_eq!(
            decode(&[0, 1, 0, 1, 0, 0, 0, 0]),
            Err(DecodeError::ReservedNotZero(1))
        );
        let nan = f32::NAN.to_be_bytes();
        assert_eq!(
            decode(&[0, 1, 0, 0, nan[0], nan[1], nan[2], nan[3]]),
            Err(DecodeError::NotFinite { index: 0 })
        );
        assert!(decode(&{
            let mut v = Vec::new();
            encode(&vec![0.5; MAX_DIMS], &mut v);
            v
        })
        .is_ok());
    }

    proptest! {
        #[test]
        fn round_trip(v in proptest::collection::vec(any::<f32>().prop_filter("finite", |x| x.is_finite()), 1..100)) {
            let mut bytes = Vec::new();
            encode(&v, &mut bytes);
            let back = decode(&bytes).unwrap();
            prop_assert_eq!(back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}
