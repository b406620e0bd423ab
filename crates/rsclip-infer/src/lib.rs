//! The shared inference workers' protocol, without Postgres: a queue of request slots that
//! lives in one fixed region of shared memory (offsets and atomics only, no pointers), the
//! policy a worker uses to form batches across backends, and the statistics it keeps.
//!
//! Backends keep decoding, preprocessing and tokenizing; they put the ready tensor into a slot
//! (inline when it fits, else in a DSM segment the slot names), wake an idle worker and wait
//! for the slot to be answered. A worker takes the oldest queued request and every other queued
//! request that can share its model run (same kind, model and row shape) up to the batch limit,
//! runs them as one batch and answers each slot. The Postgres glue (`src/inference.rs`) maps
//! the region into shared memory, the owners and workers to latches, and runs ONNX Runtime.
//!
//! Every slot moves through one state machine (see [`queue`]); each transition is one atomic
//! compare-and-swap by the side that owns the slot in that state, so a slot's payload is only
//! ever written by one process at a time, and a cancelled request's late answer is dropped.

pub mod batch;
pub mod queue;
pub mod stats;

pub use batch::{worker_devices, Backoff, BatchFormer, BatchPolicy, Decision};
pub use queue::{
    Kind, OwnedRegion, Payload, Poll, Queue, Region, Reply, Request, SubmitError, TakenRequest,
    Ticket, Wake,
};
pub use stats::{Histogram, WorkerStats, WorkerStatsSnapshot};
