//! Per-worker counters in shared memory, and a log-linear histogram for queue-wait percentiles.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Sub-buckets per power of two: a percentile is known within 1/4 of its power of two.
const SUB: u32 = 4;
/// Values up to 2^40 µs (12 days) get their own bucket; larger ones share the last.
const POWERS: u32 = 41;
/// Buckets of a [`Histogram`].
pub const BUCKETS: usize = (POWERS * SUB) as usize;

/// Counts of values (microseconds) in log-linear buckets; written with relaxed atomic adds by
/// one worker, read by anyone.
#[repr(C)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
}

/// The bucket of `v`: values below `SUB` exactly, then `SUB` buckets per power of two.
fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let p = 63 - v.leading_zeros(); // 2^p <= v
    let shift = p - SUB.trailing_zeros(); // top bits below the leading one
    let sub = ((v >> shift) as u32) & (SUB - 1);
    (((p - 1) * SUB + sub) as usize).min(BUCKETS - 1)
}

/// The smallest value of bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    let b = b as u32;
    if b < SUB {
        return b as u64;
    }
    let p = (b - SUB) / SUB + 2;
    let sub = (b - SUB) % SUB;
    (1u64 << p) + ((sub as u64) << (p - SUB.trailing_zeros()))
}

impl Histogram {
    pub fn record(&self, v: u64) {
        self.counts[bucket(v)].fetch_add(1, Relaxed);
    }

    /// The counts as they are now.
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// The `q` quantile (0..=1) of the values in `counts` (a snapshot): the upper end of the
    /// bucket holding it, so never below the true value. None when there are no values.
    pub fn quantile(counts: &[u64], q: f64) -> Option<u64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(if b + 1 < BUCKETS {
                    bucket_floor(b + 1) - 1
                } else {
                    u64::MAX
                });
            }
        }
        None
    }
}

/// What one worker did, since the server started.
#[repr(C)]
pub struct WorkerStats {
    requests: AtomicU64,
    batches: AtomicU64,
    rows: AtomicU64,
    max_batch_rows: AtomicU64,
    errors: AtomicU64,
    model_ns: AtomicU64,
    model_loads: AtomicU64,
    /// Microseconds from queued to taken, per request.
    pub queue_wait: Histogram,
}

/// A copy of [`WorkerStats`] with the derived figures.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerStatsSnapshot {
    pub requests: u64,
    pub batches: u64,
    pub rows: u64,
    pub mean_batch_rows: f64,
    pub max_batch_rows: u64,
    pub errors: u64,
    pub model_ms: f64,
    pub model_loads: u64,
    pub queue_wait_p50_us: Option<u64>,
    pub queue_wait_p99_us: Option<u64>,
}

impl WorkerStats {
    /// One model run of `requests` requests and `rows` rows that took `model_ns`; `failed`
    /// counts its requests as errors.
    pub fn record_batch(&self, requests: u64, rows: u64, model_ns: u64, failed: bool) {
        self.requests.fetch_add(requests, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        self.rows.fetch_add(rows, Relaxed);
        self.max_batch_rows.fetch_max(rows, Relaxed);
        self.model_ns.fetch_add(model_ns, Relaxed);
        if failed {
            self.errors.fetch_add(requests, Relaxed);
        }
    }

    /// Requests failed without a model run (a model that cannot be loaded).
    pub fn record_errors(&self, requests: u64) {
        self.requests.fetch_add(requests, Relaxed);
        self.errors.fetch_add(requests, Relaxed);
    }

    pub fn record_model_load(&self) {
        self.model_loads.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> WorkerStatsSnapshot {
        let batches = self.batches.load(Relaxed);
        let rows = self.rows.load(Relaxed);
        let waits = self.queue_wait.snapshot();
        WorkerStatsSnapshot {
            requests: self.requests.load(Relaxed),
            batches,
            rows,
            mean_batch_rows: if batches == 0 {
                0.0
            } else {
                rows as f64 / batches as f64
            },
            max_batch_rows: self.max_batch_rows.load(Relaxed),
            errors: self.errors.load(Relaxed),
            model_ms: self.model_ns.load(Relaxed) as f64 / 1e6,
            model_loads: self.model_loads.load(Relaxed),
            queue_wait_p50_us: Histogram::quantile(&waits, 0.5),
            queue_wait_p99_us: Histogram::quantile(&waits, 0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn empty() -> Box<Histogram> {
        Box::new(Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }

    #[test]
    fn buckets_are_ordered_and_floors_invert_them() {
        let mut last = 0;
        for v in 0..100_000u64 {
            let b = bucket(v);
            assert!(b >= last, "{v}");
            last = b;
            assert!(
                bucket_floor(b) <= v && (b + 1 >= BUCKETS || v < bucket_floor(b + 1)),
                "{v}"
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    proptest! {
        #[test]
        fn quantiles_bound_the_true_value_within_a_quarter(mut values in proptest::collection::vec(0u64..10_000_000, 1..400), q in 0.0f64..=1.0) {
            let h = empty();
            for &v in &values {
                h.record(v);
            }
            values.sort_unstable();
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let truth = values[rank - 1];
            let got = Histogram::quantile(&h.snapshot(), q).unwrap();
            prop_assert!(got >= truth, "{got} < {truth}");
            prop_assert!(got as f64 <= (truth as f64 * 1.25).max(truth as f64 + 1.0) + 1.0, "{got} vs {truth}");
        }
    }

    #[test]
    fn snapshot_derives_means() {
        let s = WorkerStats {
            requests: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            max_batch_rows: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            model_ns: AtomicU64::new(0),
            model_loads: AtomicU64::new(0),
            queue_wait: *empty(),
        };
        assert_eq!(s.snapshot().queue_wait_p50_us, None);
        s.record_batch(3, 5, 2_000_000, false);
        s.record_batch(1, 1, 1_000_000, true);
        s.queue_wait.record(10);
        let snap = s.snapshot();
        assert_eq!(
            (
                snap.requests,
                snap.batches,
                snap.rows,
                snap.max_batch_rows,
                snap.errors
            ),
            (4, 2, 6, 5, 1)
        );
        assert_eq!(snap.mean_batch_rows, 3.0);
        assert_eq!(snap.model_ms, 3.0);
        assert_eq!(snap.queue_wait_p50_us, Some(11));
    }
}
