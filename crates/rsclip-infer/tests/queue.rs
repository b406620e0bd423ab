//! The request queue's protocol, single-threaded step by step, and under threads that stand in
//! for backends and workers (latches are condition variables here).

use rsclip_infer::queue::INLINE_BYTES;
use rsclip_infer::{
    BatchFormer, BatchPolicy, Decision, Kind, OwnedRegion, Payload, Poll, Queue, Request,
    SubmitError, Wake,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// One latch per wake id, as Postgres has one per process.
struct Latches {
    latches: Vec<(Mutex<bool>, Condvar)>,
    wakes: AtomicUsize,
}

impl Latches {
    fn new(n: usize) -> Self {
        Latches {
            latches: (0..n)
                .map(|_| (Mutex::new(false), Condvar::new()))
                .collect(),
            wakes: AtomicUsize::new(0),
        }
    }
    /// Waits until latch `id` is set (or `timeout`), and resets it. Returns whether it was set.
    fn wait(&self, id: u32, timeout: Duration) -> bool {
        let (m, c) = &self.latches[id as usize];
        let g = m.lock().unwrap();
        let (mut g, _) = c.wait_timeout_while(g, timeout, |set| !*set).unwrap();
        std::mem::replace(&mut *g, false)
    }
}

impl Wake for Latches {
    fn wake(&self, id: u32) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        let (m, c) = &self.latches[id as usize];
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}

struct NoWake;
impl Wake for NoWake {
    fn wake(&self, _: u32) {}
}

fn text_request(owner: u32, rows: u32, model: u64, seq_len: u32) -> (Request, Vec<u8>) {
    let input: Vec<u8> = (0..rows * seq_len)
        .flat_map(|i| (i as i64 + owner as i64 * 1000).to_le_bytes())
        .collect();
    (
        Request {
            kind: Kind::Text,
            owner,
            model_key: model,
            model_path: format!("/models/{model}"),
            rows,
            row_shape: vec![seq_len],
            payload: Payload::Inline {
                input: input.len() as u64,
                output: rows as u64 * 16,
            },
            enqueued_ns: 0,
        },
        input,
    )
}

/// The answer a fake model gives: per row, 4 floats derived from the row's tokens.
fn fake_model(input: &[u8], rows: u32) -> Vec<u8> {
    let per = input.len() / rows as usize;
    input
        .chunks(per)
        .flat_map(|row| {
            let sum: i64 = row
                .chunks(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .sum();
            (0..4).flat_map(move |k| ((sum + k) as f32).to_le_bytes())
        })
        .collect()
}

#[test]
fn one_request_round_trip() {
    let region = OwnedRegion::new(4);
    let q = region.queue();
    let latches = Latches::new(4);
    let (req, input) = text_request(1, 2, 7, 8);
    assert_eq!(
        q.submit(&req, &input, &latches),
        Err(SubmitError::NoWorkers)
    );
    assert_eq!(q.register_worker(0, 3, -1, &latches), 0);
    let t = q.submit(&req, &input, &latches).unwrap();
    assert_eq!(q.queued(), 1);
    let mut out = Vec::new();
    assert_eq!(q.poll(t, &mut out), Poll::Pending);
    let batch = q.take_batch(0, 32, 5_000);
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].request, req);
    assert_eq!(batch[0].input, input);
    assert_eq!(batch[0].queue_ns, 5_000);
    assert_eq!(q.queued(), 0);
    assert_eq!(q.poll(t, &mut out), Poll::Pending);
    let answer = fake_model(&batch[0].input, 2);
    assert!(q.complete(0, &batch[0], &answer, 2, 1_000, &latches));
    assert!(latches.wait(1, Duration::ZERO), "the owner was not woken");
    match q.poll(t, &mut out) {
        Poll::Done(r) => {
            assert_eq!(
                (r.worker, r.batch_rows, r.queue_ns, r.model_ns),
                (0, 2, 5_000, 1_000)
            );
            assert_eq!(r.sqlstate, None);
        }
        p => panic!("{p:?}"),
    }
    assert_eq!(out, answer);
    assert_eq!(q.poll(t, &mut out), Poll::Gone, "an answer is read once");
    assert_eq!(q.in_use(), 0);
    let w = q.workers();
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].0, w[0].1, w[0].2, w[0].3), (0, true, -1, 1));
    assert_eq!(w[0].4.queue_wait_p50_us, Some(5));
}

#[test]
fn failures_carry_sqlstate_and_message() {
    let region = OwnedRegion::new(4);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    let (req, input) = text_request(1, 1, 7, 8);
    let t = q.submit(&req, &input, &NoWake).unwrap();
    let batch = q.take_batch(0, 32, 0);
    let long = "é".repeat(400); // 800 bytes: cut at a character boundary
    assert!(q.fail(0, &batch[0], *b"58P01", &long, &NoWake));
    let mut out = vec![1, 2, 3];
    match q.poll(t, &mut out) {
        Poll::Failed(r) => {
            assert_eq!(r.sqlstate, Some(*b"58P01"));
            assert_eq!(r.message, "é".repeat(256));
        }
        p => panic!("{p:?}"),
    }
    assert!(out.is_empty());
    assert_eq!(q.in_use(), 0);
}

#[test]
fn bad_requests_are_refused_before_queueing() {
    let region = OwnedRegion::new(2);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    let (mut req, input) = text_request(1, 1, 7, 8);
    req.payload = Payload::Inline {
        input: input.len() as u64,
        output: INLINE_BYTES as u64 + 1,
    };
    assert!(matches!(
        q.submit(&req, &input, &NoWake),
        Err(SubmitError::Invalid(_))
    ));
    let (req, input) = text_request(1, 1, 7, 8);
    assert!(matches!(
        q.submit(&req, &input[1..], &NoWake),
        Err(SubmitError::Invalid(_))
    ));
    let mut r = req.clone();
    r.row_shape = vec![1, 2, 3, 4];
    assert!(matches!(
        q.submit(&r, &input, &NoWake),
        Err(SubmitError::Invalid(_))
    ));
    let mut r = req.clone();
    r.model_path = "x".repeat(2000);
    assert!(matches!(
        q.submit(&r, &input, &NoWake),
        Err(SubmitError::Invalid(_))
    ));
    let mut r = req.clone();
    r.payload = Payload::External {
        handle: 0,
        input: 10,
        output: 10,
    };
    assert!(matches!(
        q.submit(&r, &[], &NoWake),
        Err(SubmitError::Invalid(_))
    ));
    assert_eq!(q.in_use(), 0);
    // external payloads travel by handle
    r.payload = Payload::External {
        handle: 99,
        input: 1 << 20,
        output: 4096,
    };
    let t = q.submit(&r, &[], &NoWake).unwrap();
    let b = q.take_batch(0, 8, 0);
    assert_eq!(b[0].request.payload, r.payload);
    assert!(b[0].input.is_empty());
    q.complete(0, &b[0], &[9; 10], 1, 0, &NoWake);
    let mut out = vec![5];
    assert!(matches!(q.poll(t, &mut out), Poll::Done(_)));
    assert!(
        out.is_empty(),
        "an external answer is in the segment, not the slot"
    );
}

#[test]
fn a_full_queue_refuses_until_an_answer_is_read() {
    let region = OwnedRegion::new(3);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    let tickets: Vec<_> = (0..3)
        .map(|i| {
            let (r, inp) = text_request(i, 1, 1, 4);
            q.submit(&r, &inp, &NoWake).unwrap()
        })
        .collect();
    let (r, inp) = text_request(9, 1, 1, 4);
    assert_eq!(q.submit(&r, &inp, &NoWake), Err(SubmitError::Full));
    let b = q.take_batch(0, 32, 0);
    assert_eq!(b.len(), 3);
    for t in &b {
        q.complete(0, t, &fake_model(&t.input, 1), 3, 0, &NoWake);
    }
    // answered but unread slots are still in use
    assert_eq!(q.submit(&r, &inp, &NoWake), Err(SubmitError::Full));
    let mut out = Vec::new();
    assert!(matches!(q.poll(tickets[1], &mut out), Poll::Done(_)));
    assert!(q.submit(&r, &inp, &NoWake).is_ok());
}

#[test]
fn batches_group_compatible_requests_oldest_first_within_the_row_limit() {
    let region = OwnedRegion::new(16);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    q.register_worker(1, 1, -1, &NoWake);
    let submit = |owner: u32, rows: u32, model: u64, seq: u32, kind: Kind| {
        let (mut r, inp) = text_request(owner, rows, model, seq);
        r.kind = kind;
        q.submit(&r, &inp, &NoWake).unwrap()
    };
    let a = submit(1, 3, 1, 8, Kind::Text);
    let b = submit(2, 2, 2, 8, Kind::Text); // another model
    let c = submit(3, 4, 1, 8, Kind::Text);
    let d = submit(4, 1, 1, 8, Kind::Vision); // another kind
    let e = submit(5, 2, 1, 16, Kind::Text); // another shape
    let f = submit(6, 30, 1, 8, Kind::Text); // over the row limit with a and c
    let g = submit(7, 1, 1, 8, Kind::Text);
    let tickets =
        |batch: &[rsclip_infer::TakenRequest]| batch.iter().map(|t| t.ticket).collect::<Vec<_>>();
    let first = q.take_batch(0, 10, 0);
    assert_eq!(tickets(&first), vec![a, c, g]);
    assert_eq!(q.queued(), 4);
    // the next batch starts at the oldest left, on any worker
    assert_eq!(tickets(&q.take_batch(1, 10, 0)), vec![b]);
    assert_eq!(tickets(&q.take_batch(1, 10, 0)), vec![d]);
    assert_eq!(tickets(&q.take_batch(0, 10, 0)), vec![e]);
    // the oldest is taken whatever its rows
    assert_eq!(tickets(&q.take_batch(0, 10, 0)), vec![f]);
    assert!(q.take_batch(0, 10, 0).is_empty());
    assert_eq!(q.queued(), 0);
    // topping up a batch takes only what can join it, within the rows left
    let like = first[0].request.clone();
    let h = submit(8, 2, 2, 8, Kind::Text); // another model: stays
    let i = submit(9, 3, 1, 8, Kind::Text);
    let j = submit(10, 2, 1, 8, Kind::Text);
    assert!(q.take_like(0, &like, 0, 0).is_empty());
    assert_eq!(tickets(&q.take_like(0, &like, 4, 0)), vec![i]);
    assert_eq!(tickets(&q.take_like(0, &like, 4, 0)), vec![j]);
    assert!(q.take_like(0, &like, 4, 0).is_empty());
    assert_eq!(tickets(&q.take_batch(0, 10, 0)), vec![h]);
}

/// With several workers, a new batch takes its share of the oldest request's group, so that
/// the other workers get the rest instead of idling while one batch runs alone.
#[test]
fn a_new_batch_leaves_the_other_workers_their_share() {
    let region = OwnedRegion::new(16);
    let q = region.queue();
    let submit = |owner: u32, kind: Kind| {
        let (mut r, inp) = text_request(owner, 1, 1, 8);
        r.kind = kind;
        q.submit(&r, &inp, &NoWake).unwrap()
    };
    let rows = |batch: &[rsclip_infer::TakenRequest]| -> u32 {
        batch.iter().map(|t| t.request.rows).sum()
    };
    q.register_worker(0, 0, -1, &NoWake);
    q.register_worker(1, 1, -1, &NoWake);
    for i in 0..5 {
        submit(i, Kind::Vision);
        submit(100 + i, Kind::Text);
    }
    // five images queued (and five texts, another group): ceil(5 / 2) each
    let first = q.take_batch(0, 32, 0);
    assert!(first.iter().all(|t| t.request.kind == Kind::Vision));
    assert_eq!(rows(&first), 3);
    let second = q.take_batch(1, 32, 0);
    assert_eq!(second[0].request.kind, Kind::Text);
    assert_eq!(rows(&second), 3); // five texts: ceil(5 / 2)
                                  // one worker alone takes everything of a group, up to the row limit
    q.unregister_worker(1);
    assert_eq!(rows(&q.take_batch(0, 32, 0)), 2);
    assert_eq!(rows(&q.take_batch(0, 32, 0)), 2);
    assert_eq!(q.queued(), 0);
}

/// A worker that leaves requests queued wakes an idle one for them (once per idle worker), and
/// the submission counter tells a worker holding a batch open that something arrived.
#[test]
fn what_a_worker_leaves_queued_is_passed_on_to_an_idle_one() {
    let region = OwnedRegion::new(8);
    let q = region.queue();
    let latches = Latches::new(2);
    q.register_worker(0, 0, -1, &NoWake);
    q.register_worker(1, 1, -1, &NoWake);
    assert!(q.go_idle(0) && q.go_idle(1));
    q.wake_idle(&latches); // nothing queued: nobody woken
    assert_eq!(latches.wakes.load(Ordering::Relaxed), 0);
    let seen = q.submissions();
    let (r, inp) = text_request(1, 1, 1, 8);
    // its wake-up goes to one of the idle workers (and is lost here)
    q.submit(&r, &inp, &NoWake).unwrap();
    assert_eq!(q.submissions(), seen + 1);
    // the woken one takes nothing it can use (say): the other idle worker gets the request
    q.wake_idle(&latches);
    assert_eq!(latches.wakes.load(Ordering::Relaxed), 1);
    let woken = (0..2u32)
        .filter(|&w| latches.wait(w, Duration::from_millis(1)))
        .count();
    assert_eq!(woken, 1);
    // nobody is idle any more: nobody else is woken
    q.wake_idle(&latches);
    assert_eq!(latches.wakes.load(Ordering::Relaxed), 1);
}

#[test]
fn cancelled_requests_are_never_answered_and_free_their_slots() {
    let region = OwnedRegion::new(4);
    let q = region.queue();
    let latches = Latches::new(8);
    q.register_worker(0, 7, -1, &latches);
    // cancelled while queued: no worker sees it
    let (r, inp) = text_request(1, 1, 1, 4);
    let t = q.submit(&r, &inp, &latches).unwrap();
    assert!(!q.cancel(t));
    assert_eq!(q.queued(), 0);
    assert!(q.take_batch(0, 8, 0).is_empty());
    assert_eq!(q.in_use(), 0);
    let mut out = Vec::new();
    assert_eq!(q.poll(t, &mut out), Poll::Gone);
    // cancelled while a worker runs it: the late answer is dropped, the owner not woken
    let t = q.submit(&r, &inp, &latches).unwrap();
    let b = q.take_batch(0, 8, 0);
    assert!(q.cancel(t));
    latches.wait(1, Duration::ZERO);
    assert!(!q.complete(0, &b[0], &fake_model(&b[0].input, 1), 1, 0, &latches));
    assert!(
        !latches.wait(1, Duration::ZERO),
        "woken for a dropped answer"
    );
    assert_eq!(q.in_use(), 0);
    assert_eq!(q.poll(t, &mut out), Poll::Gone);
    // the slot's next use has a new ticket: the old one touches nothing
    let t2 = q.submit(&r, &inp, &latches).unwrap();
    assert_ne!(t2, t);
    assert!(!q.cancel(t));
    assert_eq!(q.queued(), 1);
    // cancelled after the answer: just freed
    let b = q.take_batch(0, 8, 0);
    q.complete(0, &b[0], &fake_model(&b[0].input, 1), 1, 0, &latches);
    assert!(!q.cancel(t2));
    assert_eq!(q.in_use(), 0);
}

#[test]
fn a_restarted_worker_fails_what_it_had_taken() {
    let region = OwnedRegion::new(4);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    q.register_worker(1, 1, -1, &NoWake);
    let ts: Vec<_> = (0..3)
        .map(|i| {
            let (r, inp) = text_request(i + 2, 1, 1, 4);
            q.submit(&r, &inp, &NoWake).unwrap()
        })
        .collect();
    let taken = q.take_batch(0, 2, 0);
    assert_eq!(taken.len(), 2);
    q.cancel(ts[1]); // abandoned while worker 0 held it
                     // worker 0 dies and comes back: its requests fail, the abandoned one is freed
    assert_eq!(q.register_worker(0, 0, -1, &NoWake), 2);
    let mut out = Vec::new();
    match q.poll(ts[0], &mut out) {
        Poll::Failed(r) => {
            assert_eq!(r.sqlstate, Some(*b"57P01"));
            assert!(r.message.contains("restarted"), "{}", r.message);
        }
        p => panic!("{p:?}"),
    }
    assert_eq!(q.poll(ts[1], &mut out), Poll::Gone);
    // its late answers go nowhere
    assert!(!q.complete(0, &taken[0], &[0; 16], 1, 0, &NoWake));
    // the third is still there for anyone
    assert_eq!(q.take_batch(1, 8, 0)[0].ticket, ts[2]);
    assert_eq!(q.workers()[0].3, 2, "worker 0 started twice");
}

#[test]
fn a_session_that_cannot_load_fails_its_queued_requests_only() {
    let region = OwnedRegion::new(8);
    let q = region.queue();
    q.register_worker(0, 0, -1, &NoWake);
    let ts: Vec<_> = [
        (1, 5, Kind::Text),
        (2, 6, Kind::Text),
        (3, 5, Kind::Text),
        (4, 5, Kind::Vision),
    ]
    .into_iter()
    .map(|(o, m, kind)| {
        let (mut r, i) = text_request(o, 1, m, 4);
        r.kind = kind;
        q.submit(&r, &i, &NoWake).unwrap()
    })
    .collect();
    let (like, _) = text_request(9, 1, 5, 4);
    assert_eq!(
        q.fail_queued_like(0, &like, *b"58P01", "no such model", 0, &NoWake),
        2
    );
    let mut out = Vec::new();
    assert!(matches!(q.poll(ts[0], &mut out), Poll::Failed(_)));
    assert!(matches!(q.poll(ts[2], &mut out), Poll::Failed(_)));
    // another model, or the same model's other session, is untouched
    assert_eq!(q.poll(ts[1], &mut out), Poll::Pending);
    assert_eq!(q.poll(ts[3], &mut out), Poll::Pending);
    assert_eq!(q.queued(), 2);
}

/// What a test worker thread does: the glue's loop, with a fake model that takes `model_us`.
#[allow(clippy::too_many_arguments)]
fn worker_loop(
    q: &Queue<'_>,
    latches: &Latches,
    w: usize,
    wake_id: u32,
    policy: BatchPolicy,
    model_us: u64,
    stop: &AtomicBool,
    clock: &Instant,
) {
    let now = || clock.elapsed().as_nanos() as u64;
    q.register_worker(w, wake_id, -1, latches);
    let mut former = BatchFormer::new(policy);
    while !stop.load(Ordering::SeqCst) {
        let mut batch = q.take_batch(w, policy.max_rows, now());
        if batch.is_empty() {
            if q.go_idle(w) {
                latches.wait(wake_id, Duration::from_millis(50));
                q.go_busy(w);
            }
            continue;
        }
        let first = now();
        loop {
            let rows: u32 = batch.iter().map(|t| t.request.rows).sum();
            match former.decide(batch.len(), rows, first, now()) {
                Decision::Run => break,
                Decision::Wait(ns) => {
                    latches.wait(wake_id, Duration::from_nanos(ns));
                    let more = q.take_batch(w, policy.max_rows - rows, now());
                    // only requests that can join the batch's model run
                    let (joins, others): (Vec<_>, Vec<_>) = more.into_iter().partition(|t| {
                        t.request.model_key == batch[0].request.model_key
                            && t.request.row_shape == batch[0].request.row_shape
                    });
                    batch.extend(joins);
                    for t in others {
                        q.fail(w, &t, *b"XX000", "test: mixed batch", latches);
                    }
                }
            }
        }
        let rows: u32 = batch.iter().map(|t| t.request.rows).sum();
        let started = now();
        std::thread::sleep(Duration::from_micros(model_us));
        let model_ns = now() - started;
        for t in &batch {
            let answer = fake_model(&t.input, t.request.rows);
            q.complete(w, t, &answer, rows, model_ns, latches);
        }
        q.stats(w)
            .record_batch(batch.len() as u64, rows as u64, model_ns, false);
        former.after_run(q.queued(), model_ns);
    }
    q.unregister_worker(w);
}

/// Stops the workers when a client thread panics, so that the scope ends and the test fails
/// with the client's message instead of hanging.
struct StopOnPanic<'a>(&'a AtomicBool);
impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Clients that submit, wait, read and sometimes cancel, beside two workers: every answer read
/// is the right one, nothing hangs, and no slot is left in use. Returns the workers' mean batch.
fn stress(clients: usize, per_client: usize, slots: u32, cancel_every: usize) -> f64 {
    let region = OwnedRegion::new(slots);
    let q = region.queue();
    let latches = Latches::new(clients + 2);
    let stop = AtomicBool::new(false);
    let clock = Instant::now();
    let answered = AtomicU64::new(0);
    let cancelled = AtomicU64::new(0);
    let policy = BatchPolicy {
        max_rows: 16,
        wait_ns: 300_000,
    };
    std::thread::scope(|s| {
        for w in 0..2 {
            let (q, latches, stop, clock) = (&q, &latches, &stop, &clock);
            s.spawn(move || {
                worker_loop(
                    q,
                    latches,
                    w,
                    (clients + w) as u32,
                    policy,
                    300,
                    stop,
                    clock,
                )
            });
        }
        // let the workers register
        while q.workers().len() < 2 {
            std::thread::yield_now();
        }
        let clients: Vec<_> = (0..clients)
            .map(|c| {
                let (q, latches, clock, answered, cancelled, stop) =
                    (&q, &latches, &clock, &answered, &cancelled, &stop);
                s.spawn(move || {
                    let _stop_on_panic = StopOnPanic(stop);
                    let mut out = Vec::new();
                    for i in 0..per_client {
                        let rows = 1 + (i % 3) as u32;
                        let (mut r, input) = text_request(c as u32, rows, 1, 8);
                        // make every request's tokens its own
                        let input: Vec<u8> = input
                            .chunks(8)
                            .flat_map(|b| {
                                (i64::from_le_bytes(b.try_into().unwrap()) + i as i64 * 7)
                                    .to_le_bytes()
                            })
                            .collect();
                        let want = fake_model(&input, rows);
                        r.enqueued_ns = clock.elapsed().as_nanos() as u64;
                        let t = loop {
                            match q.submit(&r, &input, latches) {
                                Ok(t) => break t,
                                Err(SubmitError::Full) => {
                                    latches.wait(c as u32, Duration::from_micros(200));
                                }
                                Err(e) => panic!("{e:?}"),
                            }
                        };
                        let give_up = cancel_every > 0 && (i + c) % cancel_every == 0;
                        let deadline = Instant::now() + Duration::from_secs(5);
                        let mut polls = 0;
                        loop {
                            if give_up && polls == (i % 3) {
                                q.cancel(t);
                                cancelled.fetch_add(1, Ordering::Relaxed);
                                assert_eq!(q.poll(t, &mut out), Poll::Gone);
                                break;
                            }
                            match q.poll(t, &mut out) {
                                Poll::Pending => {
                                    assert!(
                                        Instant::now() < deadline,
                                        "client {c} request {i} ({t:?}) hangs: {}",
                                        q.debug_slot(t.slot)
                                    );
                                    latches.wait(c as u32, Duration::from_millis(100));
                                    polls += 1;
                                }
                                Poll::Done(reply) => {
                                    assert_eq!(out, want, "client {c} request {i}: wrong answer");
                                    assert!(reply.batch_rows >= rows);
                                    answered.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                p => panic!("client {c} request {i}: {p:?}"),
                            }
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        for id in 0..latches.latches.len() {
            latches.wake(id as u32);
        }
    });
    let total = (clients * per_client) as u64;
    assert_eq!(
        answered.load(Ordering::Relaxed) + cancelled.load(Ordering::Relaxed),
        total
    );
    assert_eq!(q.in_use(), 0, "slots left in use");
    assert_eq!(q.queued(), 0);
    let stats: Vec<_> = q.workers().into_iter().map(|w| w.4).collect();
    let batches: u64 = stats.iter().map(|s| s.batches).sum();
    let requests: u64 = stats.iter().map(|s| s.requests).sum();
    assert!(requests >= answered.load(Ordering::Relaxed));
    let rows: u64 = stats.iter().map(|s| s.rows).sum();
    rows as f64 / batches.max(1) as f64
}

#[test]
fn threads_get_their_own_answers() {
    let lone = stress(1, 200, 8, 0);
    let many = stress(8, 150, 8, 0);
    println!("mean batch rows: 1 client {lone:.2}, 8 clients {many:.2}");
    assert!(lone < 2.5, "a lone client's requests were batched: {lone}");
    assert!(
        many > lone * 1.5,
        "batches did not grow with clients: {lone} -> {many}"
    );
}

#[test]
fn threads_with_cancels_and_a_small_queue() {
    stress(6, 200, 3, 5);
}

#[test]
fn no_lost_wakeups_between_one_client_and_one_worker() {
    // With latch waits far longer than the test, a lost wake-up would stall it: the test
    // measures that no wait ran into its timeout.
    let region = OwnedRegion::new(2);
    let q = region.queue();
    let latches = Latches::new(2);
    let stop = AtomicBool::new(false);
    let stalls = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            q.register_worker(0, 1, -1, &latches);
            while !stop.load(Ordering::SeqCst) {
                let batch = q.take_batch(0, 8, 0);
                if batch.is_empty() {
                    if q.go_idle(0)
                        && !latches.wait(1, Duration::from_secs(2))
                        && !stop.load(Ordering::SeqCst)
                    {
                        stalls.fetch_add(1, Ordering::Relaxed);
                    }
                    q.go_busy(0);
                    continue;
                }
                for t in &batch {
                    q.complete(0, t, &fake_model(&t.input, 1), 1, 0, &latches);
                }
            }
        });
        while q.workers().is_empty() {
            std::thread::yield_now();
        }
        let mut out = Vec::new();
        let mut seen: HashMap<u64, ()> = HashMap::new();
        for i in 0..3_000 {
            let (r, input) = text_request(0, 1, 1, 2);
            let t = q.submit(&r, &input, &latches).unwrap();
            seen.insert(t.seq, ());
            loop {
                match q.poll(t, &mut out) {
                    Poll::Pending => {
                        if !latches.wait(0, Duration::from_secs(2)) {
                            stalls.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Poll::Done(_) => break,
                    p => panic!("{i}: {p:?}"),
                }
            }
        }
        assert_eq!(seen.len(), 3_000);
        stop.store(true, Ordering::SeqCst);
        latches.wake(1);
    });
    assert_eq!(stalls.load(Ordering::Relaxed), 0, "lost wake-ups");
}
