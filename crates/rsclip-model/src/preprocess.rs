//! From decoded RGB pixels to the `pixel_values` tensor, as SiglipImageProcessorPil computes it:
//! Pillow bicubic resize to size x size (aspect ratio not kept), then per channel
//! `(f32(v as f64 * rescale) - mean) / std` in f32, laid out channel-first.

use crate::resize::{resize_bicubic, Image8};

#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    pub image_size: usize,
    pub rescale_factor: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocessing {
    /// The preprocessing a model directory's manifest prescribes.
    pub fn from_manifest(m: &crate::manifest::Manifest) -> Preprocessing {
        Preprocessing {
            image_size: m.image_size,
            rescale_factor: m.rescale_factor,
            mean: m.image_mean,
            std: m.image_std,
        }
    }

    /// Floats per image in the tensor.
    pub fn tensor_len(&self) -> usize {
        3 * self.image_size * self.image_size
    }

    /// Writes one image's `3 x size x size` values into `out`.
    pub fn pixel_values(&self, rgb: &Image8, out: &mut [f32]) {
        assert_eq!(rgb.channels, 3);
        assert_eq!(out.len(), self.tensor_len());
        let s = self.image_size;
        let resized = resize_bicubic(rgb, s, s);
        // numpy's order of operations: u8 -> f64 * factor -> f32, then (x - mean) / std in f32.
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let scaled = (v as f64 * self.rescale_factor) as f32;
                *slot = (scaled - self.mean[c]) / self.std[c];
            }
        }
        let plane = s * s;
        for (p, px) in resized.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = lut[c][px[c] as usize];
            }
        }
    }
}
