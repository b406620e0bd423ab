//! End-to-end tests of the index over `MemoryRelation`.

mod common;
mod concurrency;
mod corruption;
mod drift;
mod lifecycle;
mod nulls;
mod recall;
