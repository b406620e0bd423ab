//! Postgres-independent model side of rsclip: everything between the bytes a user stores and the
//! tensors the Git-RSCLIP (SigLIP) ONNX graphs take, reproducing the reference Python pipeline.

pub mod decode;
pub mod manifest;
pub mod preprocess;
pub mod resize;
pub mod runtime;
mod tiff_rs;
pub mod tokenize;

/// SigLIP's match probability: `sigmoid(cos * exp(logit_scale) + logit_bias)`.
pub fn probability(cosine: f64, logit_scale: f64, logit_bias: f64) -> f64 {
    1.0 / (1.0 + (-(cosine * logit_scale.exp() + logit_bias)).exp())
}
