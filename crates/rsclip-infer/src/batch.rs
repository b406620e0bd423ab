//! How a worker forms batches: when to run what it has taken and when to wait for more, the
//! back-off after a model fails to load, and which device each worker runs on.

/// The batch settings (`rsclip.max_batch`, `rsclip.batch_wait`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Rows a model run takes at most.
    pub max_rows: u32,
    /// Longest a worker holds a short batch open for more requests.
    pub wait_ns: u64,
}

/// What a worker does with the requests it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run them now.
    Run,
    /// Wait up to this long for more (then take again and decide again).
    Wait(u64),
}

/// The batch former of one worker. Waiting only pays when other requests are about to come,
/// so a worker waits only when it has seen load: requests queued behind the batch it just ran
/// (they came while the model was busy), or more than one request in its hands already. A lone
/// query on a quiet server is run the moment it is taken. It never waits longer than its last
/// model run took: a request that comes later would have been better served by running the
/// batch and taking it into the next (with a fast model, waiting the whole `wait_ns` would cost
/// more than batching gains).
#[derive(Clone, Debug)]
pub struct BatchFormer {
    pub policy: BatchPolicy,
    backlog_after_last_run: bool,
    last_run_ns: u64,
}

impl BatchFormer {
    pub fn new(policy: BatchPolicy) -> Self {
        BatchFormer {
            policy,
            backlog_after_last_run: false,
            last_run_ns: u64::MAX,
        }
    }

    /// Decides for a batch of `requests` requests and `rows` rows, whose first request was
    /// taken at `first_taken_ns`.
    pub fn decide(&self, requests: usize, rows: u32, first_taken_ns: u64, now_ns: u64) -> Decision {
        if requests == 0 {
            return Decision::Wait(self.policy.wait_ns.max(1));
        }
        let wait = self.policy.wait_ns.min(self.last_run_ns);
        if rows >= self.policy.max_rows || wait == 0 {
            return Decision::Run;
        }
        if !self.backlog_after_last_run && requests < 2 {
            return Decision::Run;
        }
        let waited = now_ns.saturating_sub(first_taken_ns);
        if waited >= wait {
            Decision::Run
        } else {
            Decision::Wait(wait - waited)
        }
    }

    /// After a model run of `run_ns`: `queued` requests were waiting when it ended.
    pub fn after_run(&mut self, queued: u32, run_ns: u64) {
        self.backlog_after_last_run = queued > 0;
        self.last_run_ns = run_ns;
    }
}

/// Retries of a model that failed to load: after `n` failures in a row the next try waits
/// `base · 2^(n-1)`, at most `max`. Requests for it fail at once with the last error meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base_ns: u64,
    pub max_ns: u64,
    failures: u32,
    retry_at_ns: u64,
}

impl Backoff {
    pub fn new(base_ns: u64, max_ns: u64) -> Self {
        Backoff {
            base_ns,
            max_ns,
            failures: 0,
            retry_at_ns: 0,
        }
    }

    /// Whether a load may be tried at `now_ns`.
    pub fn may_try(&self, now_ns: u64) -> bool {
        now_ns >= self.retry_at_ns
    }

    /// A load failed at `now_ns`; returns when the next may be tried.
    pub fn failed(&mut self, now_ns: u64) -> u64 {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u64 << (self.failures - 1).min(40);
        let delay = self.base_ns.saturating_mul(factor).min(self.max_ns);
        self.retry_at_ns = now_ns.saturating_add(delay);
        self.retry_at_ns
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at_ns = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The device of each worker: `per_device` workers on each of `devices` (CUDA ordinals), in
/// turn (worker 0 on the first device, worker 1 on the second, ...), so that the first workers
/// to start already cover every device; `per_device` CPU workers (-1) when there are none.
pub fn worker_devices(per_device: u32, devices: &[i32]) -> Vec<i32> {
    if devices.is_empty() {
        return vec![-1; per_device as usize];
    }
    (0..per_device as usize * devices.len())
        .map(|i| devices[i % devices.len()])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_lone_request_runs_at_once() {
        let f = BatchFormer::new(BatchPolicy {
            max_rows: 32,
            wait_ns: 2 * MS,
        });
        assert_eq!(f.decide(1, 1, 0, 0), Decision::Run);
        assert_eq!(f.decide(0, 0, 0, 0), Decision::Wait(2 * MS));
    }

    #[test]
    fn load_makes_short_batches_wait_at_most_the_wait() {
        let mut f = BatchFormer::new(BatchPolicy {
            max_rows: 32,
            wait_ns: 2 * MS,
        });
        // two requests in hand: others are likely coming
        assert_eq!(f.decide(2, 2, 10 * MS, 10 * MS), Decision::Wait(2 * MS));
        assert_eq!(f.decide(2, 2, 10 * MS, 11 * MS), Decision::Wait(MS));
        assert_eq!(f.decide(2, 2, 10 * MS, 12 * MS), Decision::Run);
        // a backlog after the last run: even one request waits
        f.after_run(3, 10 * MS);
        assert_eq!(f.decide(1, 1, 0, 0), Decision::Wait(2 * MS));
        // full batches never wait
        assert_eq!(f.decide(5, 32, 0, 0), Decision::Run);
        // never longer than the last model run
        f.after_run(3, MS / 4);
        assert_eq!(f.decide(2, 2, 0, 0), Decision::Wait(MS / 4));
        assert_eq!(f.decide(2, 2, 0, MS / 4), Decision::Run);
        f.after_run(0, 10 * MS);
        assert_eq!(f.decide(1, 1, 0, 0), Decision::Run);
        // no wait configured
        let f = BatchFormer::new(BatchPolicy {
            max_rows: 32,
            wait_ns: 0,
        });
        assert_eq!(f.decide(3, 3, 0, 0), Decision::Run);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(100, 1_000);
        assert!(b.may_try(0));
        assert_eq!(b.failed(0), 100);
        assert!(!b.may_try(99) && b.may_try(100));
        assert_eq!(b.failed(100), 300);
        assert_eq!(b.failed(300), 700);
        assert_eq!(b.failed(700), 1_500);
        assert_eq!(b.failed(1_500), 2_500); // capped at 1000
        assert_eq!(b.failures(), 5);
        b.succeeded();
        assert!(b.may_try(0));
        assert_eq!(b.failed(0), 100);
        for _ in 0..100 {
            b.failed(0);
        }
        assert_eq!(b.failed(0), 1_000);
    }

    #[test]
    fn devices_are_covered_in_turn() {
        assert_eq!(worker_devices(2, &[]), vec![-1, -1]);
        assert_eq!(worker_devices(1, &[0, 1, 2]), vec![0, 1, 2]);
        assert_eq!(worker_devices(2, &[3, 1]), vec![3, 1, 3, 1]);
        assert_eq!(worker_devices(0, &[0]), Vec::<i32>::new());
    }
}
