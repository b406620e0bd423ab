//! The request queue: a header and a fixed array of slots in one shared-memory region.
//!
//! ## A slot's life
//! ```text
//!            owner                      worker                      owner
//!   FREE ──claim──▶ FILLING ──submit──▶ QUEUED ──take──▶ TAKEN ──answer──▶ DONE/FAILED ──read──▶ FREE
//!                                          │                 │
//!                                   cancel │          cancel │ (the answer, when it comes,
//!                                          ▼                 ▼  frees the slot unread)
//!                                        FREE            ABANDONED ──answer──▶ FREE
//! ```
//! Each arrow is one compare-and-swap by the side that owns the slot in the state it leaves:
//! the owner (the backend that claimed it) in FILLING, DONE and FAILED, a worker in TAKEN and
//! ABANDONED. So the request and the payload are written by the owner before the release store
//! of QUEUED and read by the worker after its acquire CAS to TAKEN; the reply and the output are
//! written by the worker before its release CAS to DONE and read by the owner after it sees DONE.
//! A ticket (slot and a sequence number given at claim) names one use of a slot: an owner's
//! late call with an old ticket finds another sequence number and touches nothing.
//!
//! ## Waking
//! Owners and workers sleep on latches; the queue names them by a wake id the glue maps to a
//! latch ([`Wake`]). A worker about to sleep marks itself idle and then looks at the queue once
//! more; an owner that has queued a request takes the idle mark of one idle worker and wakes
//! it. Both sides use sequentially consistent operations on the queued count and the idle mark,
//! so at least one of them sees the other: a request is never left queued while every worker
//! sleeps. Busy workers need no wake: they look at the queue after every batch.

use crate::stats::{WorkerStats, WorkerStatsSnapshot};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

/// Identifies the region's layout (bumped with any change of it).
pub const MAGIC: u64 = 0x7273_636c_6970_5131; // "rsclipQ1"
/// Workers the header has room for.
pub const MAX_WORKERS: usize = 32;
/// Payload bytes a slot holds inline: one text's token ids and its embedding with room to
/// spare. Larger requests (images, arrays of texts) travel in a DSM segment named by the slot.
pub const INLINE_BYTES: usize = 16 * 1024;
/// Longest model directory path a request can name.
pub const MODEL_PATH_BYTES: usize = 1024;
/// Longest error message a reply carries (longer ones are cut at a character boundary).
pub const MESSAGE_BYTES: usize = 512;

const FREE: u32 = 0;
const FILLING: u32 = 1;
const QUEUED: u32 = 2;
const TAKEN: u32 = 3;
const DONE: u32 = 4;
const FAILED: u32 = 5;
const ABANDONED: u32 = 6;

/// No worker holds the slot.
const NO_WORKER: u32 = u32::MAX;

/// Which encoder a request needs.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Token ids (`i64`) of texts.
    Text = 1,
    /// Pixel tensors (`f32`, channels first) of images.
    Vision = 2,
}

/// Where a request's tensor and answer are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payload {
    /// In the slot: `input` bytes of tensor, answered by `output` bytes (each at most
    /// [`INLINE_BYTES`]; the output overwrites the input).
    Inline { input: u64, output: u64 },
    /// In the DSM segment `handle` (never 0): the tensor at offset 0 (`input` bytes), the
    /// answer after it (`output` bytes). The owner creates the segment and the worker attaches
    /// to it, so an owner that gives up can drop its mapping while a worker still writes.
    External {
        handle: u32,
        input: u64,
        output: u64,
    },
}

impl Payload {
    /// Bytes of tensor the request carries.
    pub fn input_bytes(&self) -> u64 {
        match *self {
            Payload::Inline { input, .. } | Payload::External { input, .. } => input,
        }
    }
    /// Bytes of answer the request expects.
    pub fn output_bytes(&self) -> u64 {
        match *self {
            Payload::Inline { output, .. } | Payload::External { output, .. } => output,
        }
    }
}

/// One request: `rows` texts or images of one row shape for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// Wake id of the waiting owner.
    pub owner: u32,
    /// The model the tensor was made for (its directory and files; see the glue): requests of
    /// different keys never share a batch.
    pub model_key: u64,
    /// The model directory the worker loads for this key.
    pub model_path: String,
    pub rows: u32,
    /// The shape of one row (`[seq]` for texts, `[3, h, w]` for images); rows of one batch
    /// have equal shapes.
    pub row_shape: Vec<u32>,
    pub payload: Payload,
    /// When it was queued (any monotonic clock shared by the processes, in nanoseconds).
    pub enqueued_ns: u64,
}

/// What a worker says about a request it answered.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Reply {
    /// The five-character SQLSTATE of a failure; `None` on success.
    pub sqlstate: Option<[u8; 5]>,
    /// The failure's message (empty on success).
    pub message: String,
    /// Worker that answered.
    pub worker: u32,
    /// Rows in the model run that answered it (its batch).
    pub batch_rows: u32,
    /// Nanoseconds from queued to taken.
    pub queue_ns: u64,
    /// Nanoseconds of the model run.
    pub model_ns: u64,
}

/// One use of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub slot: u32,
    pub seq: u64,
}

/// Where an owner's request is.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// Not answered yet.
    Pending,
    /// Answered (an inline answer was copied out); the slot is free again.
    Done(Reply),
    /// A worker failed it (`reply.sqlstate` is set); the slot is free again.
    Failed(Reply),
    /// The ticket names no live use of a slot (already read or cancelled).
    Gone,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in use: wait (a slot frees when any answer is read) and try again.
    Full,
    /// No worker has registered (none configured, or none started yet).
    NoWorkers,
    /// The request does not fit: an inline payload over [`INLINE_BYTES`], a path over
    /// [`MODEL_PATH_BYTES`], a shape of more than 3 dimensions, input bytes not matching.
    Invalid(String),
}

/// A request a worker took: a copy of it and of its inline input.
#[derive(Clone, Debug)]
pub struct TakenRequest {
    pub ticket: Ticket,
    pub request: Request,
    /// The inline tensor (empty for an external payload).
    pub input: Vec<u8>,
    /// Nanoseconds it waited in the queue.
    pub queue_ns: u64,
}

/// Maps wake ids to latches (the glue) or to threads (tests).
pub trait Wake {
    fn wake(&self, id: u32);
}

#[repr(C)]
struct WorkerCell {
    /// Wake id + 1 of the running worker; 0 when none is registered.
    latch: AtomicU32,
    /// 1 while the worker sleeps or is about to.
    idle: AtomicU32,
    /// The device it runs on (-1: CPU).
    device: AtomicI32,
    /// Times a worker registered in this cell (restarts included).
    starts: AtomicU32,
    stats: WorkerStats,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    nslots: AtomicU32,
    /// Requests in QUEUED (raised after the state is stored, lowered after it is left).
    queued: AtomicU32,
    next_seq: AtomicU64,
    workers: [WorkerCell; MAX_WORKERS],
}

/// The request as a slot stores it.
#[repr(C)]
#[derive(Clone, Copy)]
struct RequestCell {
    kind: u32,
    owner: u32,
    model_key: u64,
    rows: u32,
    row_ndim: u32,
    row_shape: [u32; 3],
    external: u32,
    input_bytes: u64,
    output_bytes: u64,
    enqueued_ns: u64,
    path_len: u32,
    path: [u8; MODEL_PATH_BYTES],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ReplyCell {
    failed: u32,
    sqlstate: [u8; 5],
    worker: u32,
    batch_rows: u32,
    queue_ns: u64,
    model_ns: u64,
    message_len: u32,
    message: [u8; MESSAGE_BYTES],
}

#[repr(C)]
struct Slot {
    state: AtomicU32,
    /// Worker holding it in TAKEN or ABANDONED.
    worker: AtomicU32,
    seq: AtomicU64,
    /// Copies of the request's batching fields, readable while the slot is queued (the
    /// request cell is the owner's until a worker takes the slot): a hash of what rows must
    /// share to run together, the model key and the row count.
    group: AtomicU64,
    model_key: AtomicU64,
    rows: AtomicU32,
    request: UnsafeCell<RequestCell>,
    reply: UnsafeCell<ReplyCell>,
    data: UnsafeCell<[u8; INLINE_BYTES]>,
}

/// Sizes and initializes the shared region.
pub struct Region;

impl Region {
    /// Bytes a region of `nslots` slots takes.
    pub const fn size(nslots: u32) -> usize {
        std::mem::size_of::<Header>() + nslots as usize * std::mem::size_of::<Slot>()
    }

    /// Alignment the region's start needs.
    pub const fn align() -> usize {
        let a = std::mem::align_of::<Header>();
        let b = std::mem::align_of::<Slot>();
        if a > b {
            a
        } else {
            b
        }
    }

    /// Writes an empty queue of `nslots` slots at `base`.
    ///
    /// # Safety
    /// `base` must be valid for writes of [`Region::size`]`(nslots)` bytes, aligned to
    /// [`Region::align`], and not in use by anyone else while this runs (the postmaster, at
    /// shared memory creation).
    pub unsafe fn init(base: *mut u8, nslots: u32) {
        // SAFETY: the caller gives us the whole zeroable region exclusively; every field of
        // Header and Slot is an atomic, an integer or a byte array, for which all-zero bytes
        // are a valid value (FREE, no worker, empty cells).
        unsafe { std::ptr::write_bytes(base, 0, Self::size(nslots)) };
        // SAFETY: aligned and valid per the contract; zeroed above.
        let header = unsafe { &*(base as *const Header) };
        header.nslots.store(nslots, Relaxed);
        for w in &header.workers {
            w.device.store(-1, Relaxed);
        }
        // SAFETY: as above; the slots follow the header.
        let slots = unsafe { slots_at(base, nslots) };
        for s in slots {
            s.worker.store(NO_WORKER, Relaxed);
        }
        header.magic.store(MAGIC, Release);
    }
}

/// # Safety
/// `base` is a region of at least `nslots` slots, as [`Region::init`] wrote it.
unsafe fn slots_at<'a>(base: *mut u8, nslots: u32) -> &'a [Slot] {
    // SAFETY: per the contract; Slot's alignment divides Header's size (both are 8-aligned
    // repr(C) structs), so the array after the header is aligned.
    unsafe {
        std::slice::from_raw_parts(
            base.add(std::mem::size_of::<Header>()) as *const Slot,
            nslots as usize,
        )
    }
}

/// A view of an initialized region.
#[derive(Clone, Copy)]
pub struct Queue<'a> {
    header: &'a Header,
    slots: &'a [Slot],
}

// SAFETY: every shared field is an atomic or an UnsafeCell whose access the slot state machine
// serializes (module documentation): one side owns a slot's cells in each state.
unsafe impl Sync for Slot {}

impl<'a> Queue<'a> {
    /// A view of the region at `base`, which [`Region::init`] initialized.
    ///
    /// # Safety
    /// `base` must stay mapped (at any address in each process) for `'a`, and be a region that
    /// [`Region::init`] wrote with at least `len` bytes valid.
    pub unsafe fn attach(base: *mut u8, len: usize) -> Result<Queue<'a>, String> {
        if len < std::mem::size_of::<Header>() {
            return Err(format!("region of {len} bytes is smaller than its header"));
        }
        // SAFETY: valid and aligned per the contract.
        let header = unsafe { &*(base as *const Header) };
        if header.magic.load(Acquire) != MAGIC {
            return Err("the region is not an initialized rsclip queue".into());
        }
        let nslots = header.nslots.load(Relaxed);
        if Region::size(nslots) > len {
            return Err(format!("region of {len} bytes cannot hold {nslots} slots"));
        }
        Ok(Queue {
            header,
            // SAFETY: initialized with nslots slots, within len bytes (checked).
            slots: unsafe { slots_at(base, nslots) },
        })
    }

    pub fn nslots(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Requests waiting to be taken.
    pub fn queued(&self) -> u32 {
        self.header.queued.load(SeqCst)
    }

    /// Requests submitted so far (a counter that only grows): a worker holding a batch open
    /// watches it for arrivals.
    pub fn submissions(&self) -> u64 {
        self.header.next_seq.load(Acquire)
    }

    /// Wakes one idle worker, if any: a worker that leaves requests queued (its fair share
    /// taken, or incompatible ones) passes them on instead of leaving them to the next submit.
    pub fn wake_idle(&self, wake: &dyn Wake) {
        if self.header.queued.load(SeqCst) > 0 {
            self.wake_idle_worker(wake);
        }
    }

    /// Workers registered now.
    pub fn registered_workers(&self) -> usize {
        self.header
            .workers
            .iter()
            .filter(|w| w.latch.load(Acquire) != 0)
            .count()
    }

    /// Whether any worker is registered (a cheap look, for callers' waits).
    pub fn any_worker(&self) -> bool {
        self.header
            .workers
            .iter()
            .any(|w| w.latch.load(Acquire) != 0)
    }

    /// Slots not free (filling, queued, taken or answered and unread).
    pub fn in_use(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state.load(Acquire) != FREE)
            .count()
    }

    // ---- owner side ----

    /// Queues `request` with its inline `input` (empty for an external payload) and wakes an
    /// idle worker.
    pub fn submit(
        &self,
        request: &Request,
        input: &[u8],
        wake: &dyn Wake,
    ) -> Result<Ticket, SubmitError> {
        let cell = encode_request(request, input)?;
        if !self
            .header
            .workers
            .iter()
            .any(|w| w.latch.load(Acquire) != 0)
        {
            return Err(SubmitError::NoWorkers);
        }
        // Start the search at a moving point: slots are taken in ticket order anyway.
        let n = self.slots.len();
        if n == 0 {
            return Err(SubmitError::Full);
        }
        let start = (self.header.next_seq.load(Relaxed) as usize) % n;
        let (index, slot) = (0..n)
            .map(|i| (start + i) % n)
            .map(|i| (i, &self.slots[i]))
            .find(|(_, s)| {
                s.state.load(Relaxed) == FREE
                    && s.state
                        .compare_exchange(FREE, FILLING, Acquire, Relaxed)
                        .is_ok()
            })
            .ok_or(SubmitError::Full)?;
        let seq = self.header.next_seq.fetch_add(1, Relaxed) + 1;
        slot.seq.store(seq, Relaxed);
        slot.group.store(group_of(request), Relaxed);
        slot.model_key.store(request.model_key, Relaxed);
        slot.rows.store(request.rows, Relaxed);
        // SAFETY: the slot is ours in FILLING: no worker reads its cells before QUEUED.
        unsafe {
            *slot.request.get() = cell;
            if let Payload::Inline { .. } = request.payload {
                (&mut (*slot.data.get()))[..input.len()].copy_from_slice(input);
            }
        }
        // Counted before it is queued, so that the count never runs below the queued slots (a
        // worker that sees the count ahead of the slot looks again).
        self.header.queued.fetch_add(1, SeqCst);
        slot.state.store(QUEUED, SeqCst);
        self.wake_idle_worker(wake);
        Ok(Ticket {
            slot: index as u32,
            seq,
        })
    }

    /// Wakes the lowest-numbered idle worker. Always the same one first, not a rotation: a
    /// lone request then runs on the worker that ran the last one, whose model weights are
    /// still in the CPU caches (alternating two copies of a 400 MB text tower measured 25%
    /// slower per request); under load every worker is busy anyway.
    fn wake_idle_worker(&self, wake: &dyn Wake) {
        for w in self.header.workers.iter() {
            let latch = w.latch.load(Acquire);
            if latch != 0 && w.idle.swap(0, SeqCst) == 1 {
                wake.wake(latch - 1);
                return;
            }
        }
    }

    /// The state of the slot of `t` if `t` still names its use. The state is read first: a
    /// state stored by a later use of the slot was stored after that use's sequence number
    /// (release/acquire), so the sequence number read after it tells whose state it is. A
    /// FILLING slot is never an owner's own (submit returns after QUEUED): it is a later use
    /// whose number may not be stored yet.
    fn owned(&self, t: Ticket) -> Option<(&Slot, u32)> {
        let s = self.slots.get(t.slot as usize)?;
        let state = s.state.load(Acquire);
        (state != FILLING && state != FREE && s.seq.load(Acquire) == t.seq).then_some((s, state))
    }

    /// Looks at the request `t`. When it is answered, copies an inline answer into `output`
    /// (replacing its contents), frees the slot and returns the reply.
    pub fn poll(&self, t: Ticket, output: &mut Vec<u8>) -> Poll {
        let Some((slot, state)) = self.owned(t) else {
            return Poll::Gone;
        };
        match state {
            QUEUED | TAKEN => Poll::Pending,
            s @ (DONE | FAILED) => {
                // SAFETY: DONE/FAILED (acquired in owned) hands the cells to the owner: the
                // worker wrote them before its release CAS and touches the slot no more.
                let (reply, request) = unsafe { (*slot.reply.get(), *slot.request.get()) };
                output.clear();
                if s == DONE && request.external == 0 {
                    // SAFETY: as above.
                    let data = unsafe { &*slot.data.get() };
                    output.extend_from_slice(&data[..request.output_bytes as usize]);
                }
                let reply = decode_reply(&reply);
                slot.state.store(FREE, Release);
                if s == DONE {
                    Poll::Done(reply)
                } else {
                    Poll::Failed(reply)
                }
            }
            _ => Poll::Gone,
        }
    }

    /// Gives up request `t` (a cancelled or timed-out caller). Returns whether a worker still
    /// holds it (it will free the slot when it answers; an external payload's segment stays
    /// mapped in the worker until then).
    pub fn cancel(&self, t: Ticket) -> bool {
        // Only this owner moves its slot out of QUEUED to FREE, or out of TAKEN to ABANDONED,
        // and a worker frees only ABANDONED slots: so while `owned` says the slot is ours it
        // stays ours, and a failed CAS means a worker moved it on (taken, or answered).
        while let Some((slot, state)) = self.owned(t) {
            match state {
                QUEUED => {
                    if slot
                        .state
                        .compare_exchange(QUEUED, FREE, AcqRel, Acquire)
                        .is_ok()
                    {
                        self.header.queued.fetch_sub(1, SeqCst);
                        return false;
                    }
                }
                TAKEN => {
                    if slot
                        .state
                        .compare_exchange(TAKEN, ABANDONED, AcqRel, Acquire)
                        .is_ok()
                    {
                        return true;
                    }
                }
                DONE | FAILED => {
                    slot.state.store(FREE, Release);
                    return false;
                }
                _ => return false,
            }
        }
        false
    }

    // ---- worker side ----

    /// Registers worker `w` (wake id `wake_id`, on `device`, -1 for the CPU). Requests an
    /// earlier incarnation of `w` had taken fail with SQLSTATE 57P01 (their model run died with
    /// it). Returns how many failed.
    pub fn register_worker(&self, w: usize, wake_id: u32, device: i32, wake: &dyn Wake) -> usize {
        let cell = &self.header.workers[w];
        cell.device.store(device, Relaxed);
        cell.idle.store(0, SeqCst);
        cell.starts.fetch_add(1, Relaxed);
        let mut failed = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.worker.load(Acquire) == w as u32
                && matches!(s.state.load(Acquire), TAKEN | ABANDONED)
            {
                let taken = TakenRequest {
                    ticket: Ticket {
                        slot: i as u32,
                        seq: s.seq.load(Acquire),
                    },
                    // SAFETY: TAKEN/ABANDONED by this cell's worker, which is us now.
                    request: decode_request(unsafe { &*s.request.get() }),
                    input: Vec::new(),
                    queue_ns: 0,
                };
                self.answer(
                    w,
                    &taken,
                    Err((
                        *b"57P01",
                        "rsclip: the inference worker restarted while running this request".into(),
                    )),
                    0,
                    0,
                    &[],
                    wake,
                );
                failed += 1;
            }
        }
        cell.latch.store(wake_id + 1, Release);
        failed
    }

    /// Worker `w` stops (it will not take requests until it registers again).
    pub fn unregister_worker(&self, w: usize) {
        self.header.workers[w].latch.store(0, Release);
    }

    /// Worker `w` is about to sleep: marks it idle and returns true if the queue is still
    /// empty. On false it is busy again and should take requests.
    pub fn go_idle(&self, w: usize) -> bool {
        let cell = &self.header.workers[w];
        cell.idle.store(1, SeqCst);
        if self.header.queued.load(SeqCst) == 0 {
            return true;
        }
        cell.idle.store(0, SeqCst);
        false
    }

    /// Worker `w` woke up.
    pub fn go_busy(&self, w: usize) {
        self.header.workers[w].idle.store(0, SeqCst);
    }

    /// Takes for worker `w` the oldest queued request and, in ticket order, every queued
    /// request that can share its model run (same kind, model key and row shape) while the
    /// rows stay within `max_rows` (the oldest is taken whatever its rows). `now_ns` dates the
    /// take for the queue-wait statistics.
    pub fn take_batch(&self, w: usize, max_rows: u32, now_ns: u64) -> Vec<TakenRequest> {
        self.take(w, None, max_rows, now_ns)
    }

    /// Takes for worker `w`, in ticket order, queued requests that can share a model run with
    /// `like` (a request of the batch it holds) while their rows stay within `max_rows`.
    pub fn take_like(
        &self,
        w: usize,
        like: &Request,
        max_rows: u32,
        now_ns: u64,
    ) -> Vec<TakenRequest> {
        if max_rows == 0 {
            return Vec::new();
        }
        self.take(w, Some(like), max_rows, now_ns)
    }

    fn take(
        &self,
        w: usize,
        like: Option<&Request>,
        max_rows: u32,
        now_ns: u64,
    ) -> Vec<TakenRequest> {
        // (seq, slot, group, rows) of the queued slots, oldest first.
        let mut queued: Vec<(u64, usize, u64, u32)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state.load(Acquire) == QUEUED)
            .map(|(i, s)| {
                (
                    s.seq.load(Relaxed),
                    i,
                    s.group.load(Relaxed),
                    s.rows.load(Relaxed),
                )
            })
            .collect();
        queued.sort_unstable();
        // A new batch takes its fair share of the oldest request's group: with several workers
        // (one CPU thread each, or one device each) one greedy batch would leave the others
        // idle while it runs alone.
        let max_rows = match (like, queued.first()) {
            (None, Some(&(_, _, g0, _))) => {
                let group_rows: u32 = queued
                    .iter()
                    .filter(|q| q.2 == g0)
                    .fold(0u32, |a, q| a.saturating_add(q.3));
                let workers = self.registered_workers().max(1) as u32;
                max_rows.min(group_rows.div_ceil(workers).max(1))
            }
            _ => max_rows,
        };
        let mut out: Vec<TakenRequest> = Vec::new();
        let mut rows = 0u32;
        let mut group = None;
        for (_, i, g, r) in queued {
            if group.is_some_and(|want| want != g)
                || (!out.is_empty() && rows.saturating_add(r) > max_rows)
            {
                continue;
            }
            let s = &self.slots[i];
            if s.state
                .compare_exchange(QUEUED, TAKEN, AcqRel, Acquire)
                .is_err()
            {
                continue; // another worker took it, or its owner cancelled it
            }
            // SAFETY: TAKEN is ours: the owner wrote the cells before its release of QUEUED.
            let request = decode_request(unsafe { &*s.request.get() });
            // The slot may have been reused since the scan: check the request itself.
            let fits = match out.first().map(|t| &t.request).or(like) {
                None => true,
                Some(first) => {
                    compatible(first, &request) && rows.saturating_add(request.rows) <= max_rows
                }
            };
            if !fits {
                self.put_back(s);
                continue;
            }
            group = Some(group_of(&request));
            s.worker.store(w as u32, Release);
            self.header.queued.fetch_sub(1, SeqCst);
            let input = match request.payload {
                Payload::Inline { input, .. } => {
                    // SAFETY: TAKEN is ours (above).
                    unsafe { (&(*s.data.get()))[..input as usize].to_vec() }
                }
                Payload::External { .. } => Vec::new(),
            };
            let queue_ns = now_ns.saturating_sub(request.enqueued_ns);
            self.header.workers[w]
                .stats
                .queue_wait
                .record(queue_ns / 1_000);
            rows = rows.saturating_add(request.rows);
            out.push(TakenRequest {
                ticket: Ticket {
                    slot: i as u32,
                    seq: s.seq.load(Relaxed),
                },
                request,
                input,
                queue_ns,
            });
        }
        out
    }

    /// Returns a slot this worker took but cannot use to the queue (it keeps its ticket, so it
    /// stays the oldest). Its owner may have given it up meanwhile (TAKEN to ABANDONED): then
    /// it is freed, and leaves the queued count, which the take had not lowered yet.
    fn put_back(&self, s: &Slot) {
        if s.state
            .compare_exchange(TAKEN, QUEUED, AcqRel, Acquire)
            .is_err()
            && s.state
                .compare_exchange(ABANDONED, FREE, AcqRel, Acquire)
                .is_ok()
        {
            self.header.queued.fetch_sub(1, SeqCst);
        }
    }

    /// Answers `taken` with `output` (its inline answer, ignored for an external payload, whose
    /// answer the worker wrote into the segment), `batch_rows` and `model_ns` for the reply.
    /// Returns false when the owner had given it up (the slot is freed, nobody is woken).
    pub fn complete(
        &self,
        w: usize,
        taken: &TakenRequest,
        output: &[u8],
        batch_rows: u32,
        model_ns: u64,
        wake: &dyn Wake,
    ) -> bool {
        self.answer(w, taken, Ok(()), batch_rows, model_ns, output, wake)
    }

    /// Fails `taken` with `sqlstate` and `message`. Returns false when the owner had given it
    /// up.
    pub fn fail(
        &self,
        w: usize,
        taken: &TakenRequest,
        sqlstate: [u8; 5],
        message: &str,
        wake: &dyn Wake,
    ) -> bool {
        self.answer(w, taken, Err((sqlstate, message.into())), 0, 0, &[], wake)
    }

    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        w: usize,
        taken: &TakenRequest,
        outcome: Result<(), ([u8; 5], String)>,
        batch_rows: u32,
        model_ns: u64,
        output: &[u8],
        wake: &dyn Wake,
    ) -> bool {
        let Some(slot) = self.slots.get(taken.ticket.slot as usize) else {
            return false;
        };
        if slot.seq.load(Acquire) != taken.ticket.seq || slot.worker.load(Acquire) != w as u32 {
            return false;
        }
        if slot.state.load(Acquire) == ABANDONED {
            slot.worker.store(NO_WORKER, Relaxed);
            return slot
                .state
                .compare_exchange(ABANDONED, FREE, AcqRel, Acquire)
                .map(|_| false)
                .unwrap_or(false);
        }
        let failed = outcome.is_err();
        // SAFETY: the slot is TAKEN by us (checked: seq and worker; only we leave TAKEN except
        // the owner's CAS to ABANDONED, which does not touch the cells), so its reply and data
        // cells are ours until the CAS below.
        unsafe {
            let r = &mut *slot.reply.get();
            r.worker = w as u32;
            r.batch_rows = batch_rows;
            r.queue_ns = taken.queue_ns;
            r.model_ns = model_ns;
            match &outcome {
                Ok(()) => {
                    r.failed = 0;
                    r.sqlstate = [0; 5];
                    r.message_len = 0;
                    if let Payload::Inline { output: want, .. } = taken.request.payload {
                        let n = (want as usize).min(output.len()).min(INLINE_BYTES);
                        (&mut (*slot.data.get()))[..n].copy_from_slice(&output[..n]);
                    }
                }
                Err((code, message)) => {
                    r.failed = 1;
                    r.sqlstate = *code;
                    let m = cut_at_char(message, MESSAGE_BYTES);
                    r.message[..m.len()].copy_from_slice(m.as_bytes());
                    r.message_len = m.len() as u32;
                }
            }
        }
        slot.worker.store(NO_WORKER, Relaxed);
        let to = if failed { FAILED } else { DONE };
        match slot.state.compare_exchange(TAKEN, to, AcqRel, Acquire) {
            Ok(_) => {
                wake.wake(taken.request.owner);
                true
            }
            Err(_) => {
                // The owner gave up meanwhile: the answer is dropped.
                let _ = slot
                    .state
                    .compare_exchange(ABANDONED, FREE, AcqRel, Acquire);
                false
            }
        }
    }

    /// Takes and fails every queued request that needs the session `like` needs (same model
    /// key and kind: that session cannot be loaded). Returns how many failed.
    pub fn fail_queued_like(
        &self,
        w: usize,
        like: &Request,
        sqlstate: [u8; 5],
        message: &str,
        now_ns: u64,
        wake: &dyn Wake,
    ) -> usize {
        let mut failed = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.state.load(Acquire) != QUEUED || s.model_key.load(Relaxed) != like.model_key {
                continue;
            }
            if s.state
                .compare_exchange(QUEUED, TAKEN, AcqRel, Acquire)
                .is_err()
            {
                continue;
            }
            // SAFETY: TAKEN is ours.
            let request = decode_request(unsafe { &*s.request.get() });
            if request.model_key != like.model_key || request.kind != like.kind {
                self.put_back(s); // another session, or reused since the look above
                continue;
            }
            s.worker.store(w as u32, Release);
            self.header.queued.fetch_sub(1, SeqCst);
            let taken = TakenRequest {
                ticket: Ticket {
                    slot: i as u32,
                    seq: s.seq.load(Relaxed),
                },
                queue_ns: now_ns.saturating_sub(request.enqueued_ns),
                request,
                input: Vec::new(),
            };
            self.fail(w, &taken, sqlstate, message, wake);
            failed += 1;
        }
        failed
    }

    /// A slot's state, sequence number and worker, for diagnostics.
    pub fn debug_slot(&self, slot: u32) -> String {
        match self.slots.get(slot as usize) {
            Some(s) => format!(
                "slot {slot}: state {} seq {} worker {} (queued count {})",
                s.state.load(Acquire),
                s.seq.load(Acquire),
                s.worker.load(Acquire),
                self.queued()
            ),
            None => format!("slot {slot}: none"),
        }
    }

    /// Worker `w`'s statistics.
    pub fn stats(&self, w: usize) -> &WorkerStats {
        &self.header.workers[w].stats
    }

    /// Every worker cell that has ever been registered: (worker, running, device, starts,
    /// statistics).
    pub fn workers(&self) -> Vec<(usize, bool, i32, u32, WorkerStatsSnapshot)> {
        self.header
            .workers
            .iter()
            .enumerate()
            .filter(|(_, c)| c.starts.load(Relaxed) > 0)
            .map(|(i, c)| {
                (
                    i,
                    c.latch.load(Acquire) != 0,
                    c.device.load(Relaxed),
                    c.starts.load(Relaxed),
                    c.stats.snapshot(),
                )
            })
            .collect()
    }
}

/// Whether two requests can share one model run.
fn compatible(a: &Request, b: &Request) -> bool {
    a.kind == b.kind
        && a.model_key == b.model_key
        && a.row_shape == b.row_shape
        && a.model_path == b.model_path
}

/// FNV-1a over `parts`, one after the other.
pub fn fnv1a<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in parts.into_iter().flatten() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A hash of the fields [`compatible`] compares: equal for compatible requests.
fn group_of(r: &Request) -> u64 {
    let shape: Vec<u8> = r.row_shape.iter().flat_map(|d| d.to_le_bytes()).collect();
    fnv1a([
        &(r.kind as u32).to_le_bytes()[..],
        &r.model_key.to_le_bytes(),
        &shape,
        &[0xff],
        r.model_path.as_bytes(),
    ])
}

fn cut_at_char(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn encode_request(r: &Request, input: &[u8]) -> Result<RequestCell, SubmitError> {
    let invalid = |m: String| Err(SubmitError::Invalid(m));
    if r.row_shape.is_empty() || r.row_shape.len() > 3 {
        return invalid(format!("a row shape of {} dimensions", r.row_shape.len()));
    }
    if r.model_path.len() > MODEL_PATH_BYTES {
        return invalid(format!(
            "a model path of {} bytes (at most {MODEL_PATH_BYTES})",
            r.model_path.len()
        ));
    }
    let external = match r.payload {
        Payload::Inline { input: i, output } => {
            if i as usize > INLINE_BYTES || output as usize > INLINE_BYTES {
                return invalid(format!(
                    "an inline payload of {i} bytes in, {output} out (at most {INLINE_BYTES})"
                ));
            }
            if input.len() as u64 != i {
                return invalid(format!("{} input bytes for a payload of {i}", input.len()));
            }
            0
        }
        Payload::External { handle, .. } => {
            if handle == 0 {
                return invalid("segment handle 0".into());
            }
            if !input.is_empty() {
                return invalid("inline bytes with an external payload".into());
            }
            handle
        }
    };
    let mut shape = [0u32; 3];
    shape[..r.row_shape.len()].copy_from_slice(&r.row_shape);
    let mut path = [0u8; MODEL_PATH_BYTES];
    path[..r.model_path.len()].copy_from_slice(r.model_path.as_bytes());
    Ok(RequestCell {
        kind: r.kind as u32,
        owner: r.owner,
        model_key: r.model_key,
        rows: r.rows,
        row_ndim: r.row_shape.len() as u32,
        row_shape: shape,
        external,
        input_bytes: r.payload.input_bytes(),
        output_bytes: r.payload.output_bytes(),
        enqueued_ns: r.enqueued_ns,
        path_len: r.model_path.len() as u32,
        path,
    })
}

fn decode_request(c: &RequestCell) -> Request {
    let ndim = (c.row_ndim as usize).min(3);
    let path_len = (c.path_len as usize).min(MODEL_PATH_BYTES);
    Request {
        kind: if c.kind == Kind::Vision as u32 {
            Kind::Vision
        } else {
            Kind::Text
        },
        owner: c.owner,
        model_key: c.model_key,
        model_path: String::from_utf8_lossy(&c.path[..path_len]).into_owned(),
        rows: c.rows,
        row_shape: c.row_shape[..ndim].to_vec(),
        payload: if c.external == 0 {
            Payload::Inline {
                input: c.input_bytes,
                output: c.output_bytes,
            }
        } else {
            Payload::External {
                handle: c.external,
                input: c.input_bytes,
                output: c.output_bytes,
            }
        },
        enqueued_ns: c.enqueued_ns,
    }
}

fn decode_reply(c: &ReplyCell) -> Reply {
    let n = (c.message_len as usize).min(MESSAGE_BYTES);
    Reply {
        sqlstate: (c.failed != 0).then_some(c.sqlstate),
        message: String::from_utf8_lossy(&c.message[..n]).into_owned(),
        worker: c.worker,
        batch_rows: c.batch_rows,
        queue_ns: c.queue_ns,
        model_ns: c.model_ns,
    }
}

/// A region in process memory, for tests and single-process use.
pub struct OwnedRegion {
    words: Vec<u64>,
    len: usize,
}

impl OwnedRegion {
    pub fn new(nslots: u32) -> Self {
        assert!(Region::align() <= 8);
        let len = Region::size(nslots);
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: a fresh, 8-aligned allocation of at least len bytes, ours alone.
        unsafe { Region::init(words.as_mut_ptr() as *mut u8, nslots) };
        OwnedRegion { words, len }
    }

    pub fn queue(&self) -> Queue<'_> {
        // SAFETY: initialized in new, and borrowed for as long as the view lives. The region
        // is only accessed through atomics and the slot protocol's UnsafeCells from here on.
        unsafe { Queue::attach(self.words.as_ptr() as *mut u8, self.len) }
            .expect("initialized in new")
    }
}
