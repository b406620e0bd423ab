//! Decoding stored image bytes to 8-bit RGB, the way the reference pipeline does.
//!
//! The reference is transformers' `load_image` + Pillow: EXIF orientation applied
//! (`ImageOps.exif_transpose`), then `convert("RGB")`. Pillow's conversions, reproduced here:
//! alpha is dropped (not composited), gray is replicated, palettes are looked up, 16-bit gray PNG
//! values are clipped to 255, 16-bit RGB PNG keeps the high byte.
//!
//! Remote-sensing TIFFs (more than 3 bands, or 16-bit/float samples) have no Pillow reference;
//! for them rsclip's own rule applies: take the selected bands (1-3 by default; one band is
//! replicated), and stretch 16-bit/float data per band from its 2nd to its 98th percentile to
//! 0..255 (linear interpolation between order statistics, rounded half up).
//!
//! Dimensions are checked against `max_pixels` from the header, before any pixel buffer exists.

use crate::resize::Image8;
use image::{ColorType, ImageDecoder, ImageFormat};
use std::fmt;
use std::io::Cursor;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    UnknownFormat,
    TooLarge {
        width: u64,
        height: u64,
        max_pixels: u64,
    },
    Corrupt {
        format: &'static str,
        detail: String,
    },
    Unsupported {
        format: &'static str,
        detail: String,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "image is empty (0 bytes)"),
            DecodeError::UnknownFormat => {
                write!(
                    f,
                    "unrecognized image format: expected PNG, JPEG, WebP or TIFF data"
                )
            }
            DecodeError::TooLarge {
                width,
                height,
                max_pixels,
            } => write!(
                f,
                "image is {width}x{height} pixels, more than rsclip.max_image_pixels ({max_pixels})"
            ),
            DecodeError::Corrupt { format, detail } => {
                write!(f, "corrupt or truncated {format} image: {detail}")
            }
            DecodeError::Unsupported { format, detail } => {
                write!(f, "unsupported {format} image: {detail}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
    WebP,
    Tiff,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Png => "PNG",
            Format::Jpeg => "JPEG",
            Format::WebP => "WebP",
            Format::Tiff => "TIFF",
        }
    }
}

/// Recognizes the container from its first bytes.
pub fn sniff(bytes: &[u8]) -> Option<Format> {
    match bytes {
        [0x89, b'P', b'N', b'G', ..] => Some(Format::Png),
        [0xff, 0xd8, 0xff, ..] => Some(Format::Jpeg),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some(Format::WebP),
        [b'I', b'I', 42, 0, ..]
        | [b'M', b'M', 0, 42, ..]
        | [b'I', b'I', 43, 0, ..]
        | [b'M', b'M', 0, 43, ..] => Some(Format::Tiff),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    pub max_pixels: u64,
    /// 0-based band indices used as R, G, B for multi-band TIFFs.
    pub bands: [usize; 3],
    /// The size the image will be resized to, if the decoder may shrink it on the way (JPEG's
    /// IDCT scaling); `None` decodes at full size, exactly as the reference does.
    pub reduce_to: Option<usize>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: 100_000_000,
            bands: [0, 1, 2],
            reduce_to: None,
        }
    }
}

pub(crate) fn check_size(width: u64, height: u64, opts: &DecodeOptions) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt {
            format: "image",
            detail: format!("header declares {width}x{height} pixels"),
        });
    }
    if width.saturating_mul(height) > opts.max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels: opts.max_pixels,
        });
    }
    Ok(())
}

/// Decodes any supported image to 8-bit RGB with EXIF orientation applied.
pub fn decode_rgb8(bytes: &[u8], opts: &DecodeOptions) -> Result<Image8, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = sniff(bytes).ok_or(DecodeError::UnknownFormat)?;
    // Decoders fill a truncated JPEG with grey; Pillow refuses it ("image file is truncated").
    if format == Format::Jpeg
        && !bytes
            .windows(2)
            .rev()
            .take(1 << 16)
            .any(|w| w == [0xff, 0xd9])
    {
        return Err(DecodeError::Corrupt {
            format: "JPEG",
            detail: "truncated: no end-of-image marker".into(),
        });
    }
    // Third-party decoders occasionally panic on malformed input (png 0.18.1 indexes past a
    // PLTE chunk whose length is not a multiple of 3); that is bad input, not a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match format {
        Format::Tiff => crate::tiff_rs::decode(bytes, opts),
        Format::Jpeg => decode_jpeg(bytes, opts),
        _ => decode_with_image_crate(bytes, format, opts),
    }))
    .unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "undecodable data".into());
        Err(DecodeError::Corrupt {
            format: format.name(),
            detail: format!("decoder failed: {detail}"),
        })
    })
}

/// Image dimensions read straight from the header, so a bomb is refused before any decoder
/// (which may allocate or read ahead) sees it.
pub fn header_dimensions(bytes: &[u8], format: Format) -> Option<(u64, u64)> {
    let be32 = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64)
    };
    let be16 = |i: usize| {
        bytes
            .get(i..i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as u64)
    };
    let le = |i: usize, n: usize| {
        bytes
            .get(i..i + n)
            .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    };
    match format {
        // Signature, IHDR length and type, then width and height.
        Format::Png => (bytes.get(12..16) == Some(b"IHDR"))
            .then(|| Some((be32(16)?, be32(20)?)))
            .flatten(),
        Format::Jpeg => {
            // Walk the markers to the first start-of-frame.
            let mut i = 2;
            while i + 4 <= bytes.len() {
                if bytes[i] != 0xff {
                    return None;
                }
                let marker = bytes[i + 1];
                if marker == 0xff {
                    i += 1;
                    continue;
                }
                let len = be16(i + 2)? as usize;
                let is_sof = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc);
                if is_sof {
                    return Some((be16(i + 7)?, be16(i + 5)?));
                }
                i += 2 + len;
            }
            None
        }
        Format::WebP => match bytes.get(12..16)? {
            b"VP8X" => Some((le(24, 3)? + 1, le(27, 3)? + 1)),
            b"VP8L" => {
                let bits = le(21, 4)?;
                Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
            }
            b"VP8 " => Some((le(26, 2)? & 0x3fff, le(28, 2)? & 0x3fff)),
            _ => None,
        },
        Format::Tiff => None,
    }
}

fn decode_with_image_crate(
    bytes: &[u8],
    format: Format,
    opts: &DecodeOptions,
) -> Result<Image8, DecodeError> {
    let name = format.name();
    if let Some((w, h)) = header_dimensions(bytes, format) {
        check_size(w, h, opts)?;
    }
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Unsupported(u) => DecodeError::Unsupported {
            format: name,
            detail: u.to_string(),
        },
        other => DecodeError::Corrupt {
            format: name,
            detail: other.to_string(),
        },
    };
    let image_format = match format {
        Format::Png => ImageFormat::Png,
        Format::WebP => ImageFormat::WebP,
        Format::Jpeg | Format::Tiff => unreachable!("JPEG and TIFF have their own decoders"),
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image_format);
    let mut limits = image::Limits::default();
    // Bound every allocation the decoder makes, not just the final buffer.
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64, opts)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let color = decoder.color_type();
    let mut buf = vec![0u8; decoder.total_bytes() as usize];
    decoder.read_image(&mut buf).map_err(corrupt)?;
    let (w, h) = (w as usize, h as usize);
    let mut out = Image8::new(w, h, 3);
    let px = w * h;
    let u16s = |b: &[u8]| -> Vec<u16> {
        b.chunks_exact(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]))
            .collect()
    };
    match color {
        ColorType::Rgb8 => out.data.copy_from_slice(&buf[..px * 3]),
        ColorType::Rgba8 => copy_channels(&buf, 4, &[0, 1, 2], &mut out.data),
        ColorType::L8 => copy_channels(&buf, 1, &[0, 0, 0], &mut out.data),
        ColorType::La8 => copy_channels(&buf, 2, &[0, 0, 0], &mut out.data),
        // Pillow: 16-bit gray opens as mode "I;16" and convert("RGB") clips at 255.
        ColorType::L16 => gray16_clip(&u16s(&buf), 1, &mut out.data),
        ColorType::La16 => gray16_clip(&u16s(&buf), 2, &mut out.data),
        // Pillow unpacks 16-bit RGB(A) PNG samples to their high byte.
        ColorType::Rgb16 => high_bytes(&u16s(&buf), 3, &mut out.data),
        ColorType::Rgba16 => high_bytes(&u16s(&buf), 4, &mut out.data),
        other => {
            return Err(DecodeError::Unsupported {
                format: name,
                detail: format!("pixel format {other:?}"),
            });
        }
    }
    Ok(apply_orientation(out, exif_code(orientation)))
}

/// JPEG through libjpeg-turbo's decoder (islow IDCT, fancy upsampling, the same YCbCr tables):
/// the decoder behind Pillow, so pixels are identical to the reference, not merely close.
///
/// With `opts.reduce_to`, big images are decoded at 1/2, 1/4 or 1/8 scale by the IDCT itself
/// (libjpeg's `scale_num/scale_denom`), as long as both sides stay at least
/// [`JPEG_REDUCE_MARGIN`] times the final size; the bicubic resize then has less to do. This skips
/// most of the decoding work of a 4000x3000 photo for a 224 px model, at a small, measured cost in
/// parity (see the decode tests).
fn decode_jpeg(bytes: &[u8], opts: &DecodeOptions) -> Result<Image8, DecodeError> {
    if let Some((w, h)) = header_dimensions(bytes, Format::Jpeg) {
        check_size(w, h, opts)?;
    }
    // libjpeg reports fatal errors by unwinding out of its error handler (resume_unwind, so no
    // panic hook runs); everything it allocated is released by the decoder's Drop on the way.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_jpeg_libjpeg(bytes, opts)
    }))
    .unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<String>()
            .map(|s| s.trim_start_matches("libjpeg fatal error: ").to_string())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "undecodable data".into());
        Err(DecodeError::Corrupt {
            format: "JPEG",
            detail,
        })
    })
}

/// Decoder-side reduction stops while both sides are at least this many times the target size.
pub const JPEG_REDUCE_MARGIN: usize = 4;

/// The largest libjpeg reduction (8 = none, 4 = 1/2, 2 = 1/4, 1 = 1/8) that keeps both sides of a
/// `w` x `h` image at least `JPEG_REDUCE_MARGIN * target`.
pub fn jpeg_scale_numerator(w: usize, h: usize, target: Option<usize>) -> u8 {
    let Some(target) = target.filter(|t| *t > 0) else {
        return 8;
    };
    let need = target * JPEG_REDUCE_MARGIN;
    for num in [1u8, 2, 4] {
        let scaled = |x: usize| (x * num as usize).div_ceil(8);
        if scaled(w) >= need && scaled(h) >= need {
            return num;
        }
    }
    8
}

fn decode_jpeg_libjpeg(bytes: &[u8], opts: &DecodeOptions) -> Result<Image8, DecodeError> {
    let io_err = |e: std::io::Error| DecodeError::Corrupt {
        format: "JPEG",
        detail: e.to_string(),
    };
    let mut dec = mozjpeg::Decompress::with_markers(&[mozjpeg::Marker::APP(1)])
        .from_mem(bytes)
        .map_err(io_err)?;
    let (w, h) = dec.size();
    check_size(w as u64, h as u64, opts)?;
    let orientation = dec
        .markers()
        .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .map(exif_code)
        .unwrap_or(1);
    dec.scale(jpeg_scale_numerator(w, h, opts.reduce_to));
    let unsupported = |what: &str| DecodeError::Unsupported {
        format: "JPEG",
        detail: what.to_string(),
    };
    let out = match dec.image().map_err(io_err)? {
        mozjpeg::Format::RGB(mut d) => {
            let (w, h) = (d.width(), d.height());
            let mut out = Image8::new(w, h, 3);
            d.read_scanlines_into(&mut out.data).map_err(io_err)?;
            d.finish().map_err(io_err)?;
            out
        }
        mozjpeg::Format::Gray(mut d) => {
            let (w, h) = (d.width(), d.height());
            let gray: Vec<u8> = d.read_scanlines().map_err(io_err)?;
            d.finish().map_err(io_err)?;
            let mut out = Image8::new(w, h, 3);
            copy_channels(&gray, 1, &[0, 0, 0], &mut out.data);
            out
        }
        mozjpeg::Format::CMYK(_) => return Err(unsupported("CMYK color")),
    };
    if out.data.len() != out.width * out.height * 3 {
        return Err(DecodeError::Corrupt {
            format: "JPEG",
            detail: "decoder returned a short image".into(),
        });
    }
    Ok(apply_orientation(out, orientation))
}

fn copy_channels(src: &[u8], stride: usize, pick: &[usize; 3], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(stride)) {
        d[0] = s[pick[0]];
        d[1] = s[pick[1]];
        d[2] = s[pick[2]];
    }
}

fn gray16_clip(src: &[u16], stride: usize, dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(stride)) {
        d.fill(s[0].min(255) as u8);
    }
}

fn high_bytes(src: &[u16], stride: usize, dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(stride)) {
        for c in 0..3 {
            d[c] = (s[c] >> 8) as u8;
        }
    }
}

fn exif_code(o: image::metadata::Orientation) -> u8 {
    use image::metadata::Orientation::*;
    match o {
        NoTransforms => 1,
        FlipHorizontal => 2,
        Rotate180 => 3,
        FlipVertical => 4,
        Rotate90FlipH => 5,
        Rotate90 => 6,
        Rotate270FlipH => 7,
        Rotate270 => 8,
    }
}

/// Applies EXIF orientation `code` (1-8) as Pillow's `exif_transpose` does; other codes are ignored.
pub fn apply_orientation(img: Image8, code: u8) -> Image8 {
    if !(2..=8).contains(&code) {
        return img;
    }
    let (w, h, ch) = (img.width, img.height, img.channels);
    let swap = code >= 5;
    let (ow, oh) = if swap { (h, w) } else { (w, h) };
    let mut out = Image8::new(ow, oh, ch);
    for y in 0..oh {
        for x in 0..ow {
            // Source pixel for output (x, y).
            let (sx, sy) = match code {
                2 => (w - 1 - x, y),
                3 => (w - 1 - x, h - 1 - y),
                4 => (x, h - 1 - y),
                5 => (y, x),
                6 => (y, h - 1 - x),
                7 => (w - 1 - y, h - 1 - x),
                8 => (w - 1 - y, x),
                _ => unreachable!(),
            };
            let s = (sy * w + sx) * ch;
            let d = (y * ow + x) * ch;
            out.data[d..d + ch].copy_from_slice(&img.data[s..s + ch]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(w: usize, h: usize) -> Image8 {
        let mut im = Image8::new(w, h, 1);
        im.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u8);
        im
    }

    #[test]
    fn orientations_compose_like_rotations() {
        let im = numbered(3, 2);
        let rot = |i: Image8, c| apply_orientation(i, c);
        assert_eq!(rot(rot(im.clone(), 6), 8), im);
        assert_eq!(rot(rot(im.clone(), 5), 5), im);
        assert_eq!(rot(rot(im.clone(), 6), 6), rot(im.clone(), 3));
        assert_eq!(rot(rot(im.clone(), 5), 3), rot(im.clone(), 7));
        assert_eq!(rot(rot(im.clone(), 2), 4), rot(im.clone(), 3));
        // Rotating 90 degrees clockwise puts the bottom-left pixel at the top-left.
        let r = rot(im.clone(), 6);
        assert_eq!((r.width, r.height), (2, 3));
        assert_eq!(r.data[0], im.data[3]);
        assert_eq!(rot(im.clone(), 1), im);
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), Some(Format::Png));
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Some(Format::Jpeg));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::WebP));
        assert_eq!(sniff(b"II*\0"), Some(Format::Tiff));
        assert_eq!(sniff(b"MM\0*"), Some(Format::Tiff));
        assert_eq!(sniff(b"GIF89a"), None);
        assert_eq!(
            decode_rgb8(b"", &DecodeOptions::default()),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode_rgb8(b"hello", &DecodeOptions::default()),
            Err(DecodeError::UnknownFormat)
        );
    }
}
