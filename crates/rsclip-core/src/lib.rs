//! Postgres-independent core of rsclip.
//!
//! Everything here is plain Rust so it can be unit-tested, property-tested and fuzzed without a
//! server: the text and binary wire formats of the `embedding` type and the distance kernels.
//! The pgrx crate at the repository root is thin glue around these modules.

pub mod binary;
pub mod bits;
pub mod distance;
pub mod fastscan;
pub mod in_order;
pub mod int8;
pub mod lru;
pub mod text;

/// Largest number of dimensions an `embedding` may have (pgvector's limit too, so values move
/// freely between the two types).
pub const MAX_DIMS: usize = 16000;

/// Why a vector of floats is not a valid embedding, independent of how it was spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    Empty,
    TooManyDims(usize),
}

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShapeError::Empty => write!(f, "embedding must have at least 1 dimension"),
            ShapeError::TooManyDims(n) => {
                write!(
                    f,
                    "embedding cannot have more than {MAX_DIMS} dimensions, got {n}"
                )
            }
        }
    }
}

/// Checks the dimension count every constructor must respect.
pub fn check_dims(dims: usize) -> Result<(), ShapeError> {
    if dims == 0 {
        Err(ShapeError::Empty)
    } else if dims > MAX_DIMS {
        Err(ShapeError::TooManyDims(dims))
    } else {
        Ok(())
    }
}

/// Scales `values` to unit Euclidean length in place; a zero vector stays zero (as pgvector's
/// `l2_normalize`), because there is no direction to keep.
pub fn normalize_in_place(values: &mut [f32]) {
    let norm = (distance::dot(values, values) as f64).sqrt();
    if norm > 0.0 {
        for v in values.iter_mut() {
            *v = (*v as f64 / norm) as f32;
        }
    }
}
