//! TIFF decoding, including remote-sensing rasters (see `decode` for the rules).

use crate::decode::{apply_orientation, DecodeError, DecodeOptions};
use crate::resize::Image8;
use std::io::Cursor;
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;
use tiff::ColorType;

const NAME: &str = "TIFF";

fn corrupt(e: tiff::TiffError) -> DecodeError {
    match e {
        tiff::TiffError::UnsupportedError(u) => DecodeError::Unsupported {
            format: NAME,
            detail: u.to_string(),
        },
        other => DecodeError::Corrupt {
            format: NAME,
            detail: other.to_string(),
        },
    }
}

/// Samples of one decoded raster, widened to f64 only where stretching needs it.
enum Samples {
    U8(Vec<u8>),
    Wide(Vec<f64>),
}

pub fn decode(bytes: &[u8], opts: &DecodeOptions) -> Result<Image8, DecodeError> {
    let mut limits = Limits::default();
    let cap = usize::try_from(opts.max_pixels.saturating_mul(16))
        .unwrap_or(usize::MAX)
        .max(1 << 20);
    limits.decoding_buffer_size = cap;
    limits.intermediate_buffer_size = cap;
    let mut dec = Decoder::new(Cursor::new(bytes))
        .map_err(corrupt)?
        .with_limits(limits);
    let (w, h) = dec.dimensions().map_err(corrupt)?;
    crate::decode::check_size(w as u64, h as u64, opts)?;
    let color = dec.colortype().map_err(corrupt)?;
    let orientation = dec
        .find_tag_unsigned::<u16>(Tag::Orientation)
        .ok()
        .flatten()
        .unwrap_or(1);
    let planar = dec
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .ok()
        .flatten()
        .unwrap_or(1)
        == 2;
    let (bands, has_alpha, palette) = match color {
        ColorType::Gray(_) => (1usize, false, false),
        ColorType::GrayA(_) => (2, true, false),
        ColorType::RGB(_) => (3, false, false),
        ColorType::RGBA(_) => (4, true, false),
        ColorType::Multiband { num_samples, .. } => (num_samples as usize, false, false),
        ColorType::Palette(_) => (1, false, true),
        other => {
            return Err(DecodeError::Unsupported {
                format: NAME,
                detail: format!("color type {other:?}"),
            });
        }
    };
    if palette {
        return Err(DecodeError::Unsupported {
            format: NAME,
            detail: "palette TIFF".into(),
        });
    }
    let result = dec.read_image().map_err(corrupt)?;
    let samples = match result {
        DecodingResult::U8(v) => Samples::U8(v),
        DecodingResult::U16(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::U32(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::I8(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::I16(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::I32(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::F32(v) => Samples::Wide(v.into_iter().map(f64::from).collect()),
        DecodingResult::F64(v) => Samples::Wide(v),
        _ => {
            return Err(DecodeError::Unsupported {
                format: NAME,
                detail: "sample format".into(),
            })
        }
    };
    let (w, h) = (w as usize, h as usize);
    let px = w * h;
    let len = match &samples {
        Samples::U8(v) => v.len(),
        Samples::Wide(v) => v.len(),
    };
    if len < px * bands {
        return Err(DecodeError::Corrupt {
            format: NAME,
            detail: format!("{len} samples for {w}x{h}x{bands}"),
        });
    }
    // Which source bands become R, G, B: gray is replicated, alpha dropped (as Pillow's
    // convert("RGB")), multi-band rasters use the selected bands.
    let color_bands = if has_alpha { bands - 1 } else { bands };
    let pick: [usize; 3] = if color_bands == 1 {
        [0, 0, 0]
    } else if color_bands == 3 && !matches!(color, ColorType::Multiband { .. }) {
        [0, 1, 2]
    } else {
        for &b in &opts.bands {
            if b >= color_bands {
                return Err(DecodeError::Unsupported {
                    format: NAME,
                    detail: format!(
                        "band {} selected but the image has {color_bands} bands",
                        b + 1
                    ),
                });
            }
        }
        opts.bands
    };
    let index = |pixel: usize, band: usize| {
        if planar {
            band * px + pixel
        } else {
            pixel * bands + band
        }
    };
    let mut out = Image8::new(w, h, 3);
    match samples {
        Samples::U8(v) => {
            for p in 0..px {
                for c in 0..3 {
                    out.data[p * 3 + c] = v[index(p, pick[c])];
                }
            }
        }
        Samples::Wide(v) => {
            for c in 0..3 {
                let band: Vec<f64> = (0..px).map(|p| v[index(p, pick[c])]).collect();
                let stretched = stretch(&band);
                for (dst, value) in out.data.chunks_exact_mut(3).zip(stretched) {
                    dst[c] = value;
                }
            }
        }
    }
    Ok(apply_orientation(out, orientation.min(255) as u8))
}

/// numpy's default (linear) percentile of sorted data.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let idx = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = idx.floor() as usize;
    let hi = idx.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (idx - lo as f64)
}

/// Stretches one band from its 2nd to 98th percentile onto 0..255. Non-finite samples (nodata
/// in float rasters) are left out of the percentiles and map to 0.
pub fn stretch(band: &[f64]) -> Vec<u8> {
    let mut sorted: Vec<f64> = band.iter().copied().filter(|x| x.is_finite()).collect();
    if sorted.is_empty() {
        return vec![0; band.len()];
    }
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let (lo, hi) = (percentile(&sorted, 2.0), percentile(&sorted, 98.0));
    band.iter()
        .map(|&x| {
            if !x.is_finite() || hi <= lo {
                return 0;
            }
            ((x - lo) / (hi - lo) * 255.0 + 0.5)
                .floor()
                .clamp(0.0, 255.0) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_matches_numpy_linear() {
        let s: Vec<f64> = (0..11).map(f64::from).collect();
        assert_eq!(percentile(&s, 2.0), 0.2);
        assert_eq!(percentile(&s, 98.0), 9.8);
        assert_eq!(percentile(&[5.0], 50.0), 5.0);
    }

    #[test]
    fn stretch_maps_percentiles_to_the_ends() {
        let band: Vec<f64> = (0..=100).map(f64::from).collect();
        let out = stretch(&band);
        assert_eq!(out[0], 0);
        assert_eq!(out[2], 0);
        assert_eq!(out[98], 255);
        assert_eq!(out[100], 255);
        assert_eq!(out[50], 128);
        assert_eq!(stretch(&[7.0, 7.0]), vec![0, 0]);
    }
}
