//! The copy engine of `vimg convert`: a producer walks the source's block status and queues
//! jobs; worker threads read (and compress, or compare with the new backing file) in parallel
//! and turn each job into a list of [`Action`]s on the target, which they then carry out.
//!
//! Ordered mode (the default for qcow2 targets, like qemu-img without `-W`): actions are
//! carried out in job order, so the target's clusters are allocated in guest order while reads
//! and compression still overlap. Each worker holds at most one job's buffers, so memory stays
//! bounded by the thread count times the job size. Free-running mode (`-W`, and raw targets,
//! whose layout does not depend on write order) carries actions out as soon as they are ready.

use super::COMPRESS_CHUNK;
use crate::block::{BlockImage, BlockStatus};
use crate::capability::CompressedWrites;
use crate::direct_io::AlignedBuf;
use crate::error::{Error, ErrorKind, Result};
use crate::offsets::GuestOffset;
use crate::ops::transfer::{read_clamped, status, Cursor, Progress, CHUNK};
use crate::zeros::is_zero;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Duration;

/// Where and how to copy.
pub(super) struct Plan<'a> {
    /// The source (possibly several images concatenated).
    pub src: &'a dyn BlockImage,
    /// The target, at least as large as the source.
    pub dst: &'a dyn BlockImage,
    /// The target's compressed writes, when clusters are to be stored compressed (a fresh
    /// image of a format that compresses).
    pub compress: Option<&'a dyn CompressedWrites>,
    /// The target's backing file, when the target has one (`-B`): clusters reading the same in
    /// it are left unallocated.
    pub backing: Option<&'a dyn BlockImage>,
    /// The layer of the source's chain that is the target's backing file (same file, same
    /// format), if any: ranges the source's upper layers leave unallocated down to it need no
    /// reading.
    pub inherit_depth: Option<u32>,
    /// Ranges reading as zero must be written (an existing target that may hold old data).
    pub zero_needed: bool,
    /// `-S`: zero detection granularity, 0 for none (everything written).
    pub sparse: u64,
    /// The target's cluster size (decisions against a backing file, and compression, work in
    /// whole clusters); 512 for raw targets.
    pub cluster: u64,
    /// Carry out writes in guest order (see the module documentation).
    pub ordered: bool,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// `--salvage`: a source range that cannot be read is retried 512 bytes at a time, and
    /// the pieces that still fail are written as zeros, with a warning on standard error
    /// (unless `quiet`), as qemu-img does.
    pub salvage: bool,
    /// No salvage warnings.
    pub quiet: bool,
    /// `-r`: bytes of the disk per second to copy at most; 0 for no limit.
    pub rate: u64,
    /// `-C`: data ranges are copied as they are, zero blocks in them included (as qemu's
    /// copy offloading copies them); ranges the source reports as zeros stay holes.
    pub verbatim: bool,
    /// With `verbatim`: set once the kernel refused an in-kernel copy (`copy_file_range`),
    /// after which data is read and written (as qemu-img stops offloading after a failure).
    pub offload_failed: AtomicBool,
    /// The source is several images joined ([`super::concat::Concat`]): with `verbatim`, data
    /// ranges are written whole (as qemu's offloaded copy of each part leaves them), without
    /// `copy_file_range` (the joined image does not say which part's file holds a range).
    pub joined: bool,
}

/// Reads `buf.len()` source bytes at `off`; with `--salvage`, a failed read is retried sector by
/// sector and the sectors that cannot be read come back as zeros, each with qemu-img's warning.
fn read_source(plan: &Plan<'_>, buf: &mut [u8], off: u64) -> Result<()> {
    let Err(e) = plan.src.read_at(buf, GuestOffset(off)) else {
        return Ok(());
    };
    if !plan.salvage {
        // qemu-img's words first (`error while reading at byte N`, N the guest offset), then
        // vimg's (what failed, where in the file, the OS cause), as for writes.
        if e.kind() != ErrorKind::Io {
            return Err(e);
        }
        let what = format!("error while reading at byte {off}: {}", e.what());
        return Err(e.reworded(what));
    }
    for (i, sector) in buf.chunks_mut(512).enumerate() {
        let at = off + i as u64 * 512;
        if let Err(e) = plan.src.read_at(sector, GuestOffset(at)) {
            if !plan.quiet {
                // qemu's words first (it reports every failed read as EIO), then vimg's cause.
                eprintln!(
                    "vimg: warning: error while reading offset {at}: Input/output error ({e})"
                );
            }
            sector.fill(0);
        }
    }
    Ok(())
}

/// Keeps the copy at or below `rate` bytes per second (shared by the workers).
struct Pace {
    rate: u64,
    start: std::time::Instant,
    bytes: Mutex<u64>,
}

impl Pace {
    /// Counts `n` bytes copied and sleeps until they are due.
    fn account(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let total = {
            let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
            *b += n;
            *b
        };
        let due = Duration::from_secs_f64(total as f64 / self.rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// A piece of work for the workers.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Guest data to read and write.
    Data { off: u64, len: u64 },
    /// A range known to read as zeros.
    Zero { off: u64, len: u64 },
    /// Whole target clusters to compare with the backing file: equal ones are left out.
    Compare { off: u64, len: u64 },
}

impl Job {
    fn len(&self) -> u64 {
        match *self {
            Job::Data { len, .. } | Job::Zero { len, .. } | Job::Compare { len, .. } => len,
        }
    }
}

/// One change to the target, prepared by a worker.
#[derive(Debug)]
enum Action {
    /// Write `len` bytes of the worker's buffer, from `at`, at guest offset `off`.
    Write { off: u64, at: usize, len: usize },
    /// Make the range read as zeros (a zero cluster, or a hole).
    Zero { off: u64, len: u64 },
    /// Write zeros as data (`-S 0`).
    Fill { off: u64, len: u64 },
    /// Store a compressed cluster.
    Compressed { gc: u64, z: Vec<u8> },
    /// Copy `len` bytes stored at `host` in the layer at `depth` of the source to guest
    /// offset `off` of the target inside the kernel (`-C`); read and written if it cannot.
    CopyRange {
        off: u64,
        len: u64,
        host: u64,
        depth: u32,
    },
}

/// A worker's reusable memory. Every buffer the kernel copies into or out of is page-aligned:
/// a large `Vec<u8>` from the system allocator starts 16 bytes past a page boundary, and the
/// kernel's copy from the page cache into such a buffer was measured 1.5 to 4 times slower
/// here (2 GiB in 2 MiB `pread`s: 0.19-0.23 s at offset 0, 0.29-0.34 s at 16, 0.84 s at 8).
#[derive(Default)]
struct Scratch {
    /// Page-aligned, so that whole aligned chunks go to an `O_DIRECT` target unbounced.
    buf: AlignedBuf,
    /// The backing file's data for a compare job.
    backing: AlignedBuf,
    /// Zeros written as data (`-S 0`).
    zeros: AlignedBuf,
    /// One cluster padded for compression.
    cluster: AlignedBuf,
    actions: Vec<Action>,
}

/// The reorder window of ordered mode: prepared jobs wait here, keyed by their sequence number,
/// until every job before them is written. Whichever worker parks the next job to write
/// becomes the committer and writes the consecutive run that is ready, while the others go on
/// preparing jobs (up to `limit` parked ones, which bounds memory).
struct Reorder {
    state: Mutex<ReorderState>,
    changed: Condvar,
    limit: usize,
}

#[derive(Default)]
struct ReorderState {
    /// The next job to write.
    next: u64,
    /// Prepared jobs waiting for their turn, with their guest length.
    parked: std::collections::BTreeMap<u64, (u64, Scratch)>,
    /// A worker is writing parked jobs.
    committing: bool,
    /// Scratch memory of written jobs, for reuse.
    free: Vec<Scratch>,
}

impl Reorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReorderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks the prepared job `seq` and, unless another worker is at it, writes every job
    /// that is ready in order. Returns scratch memory for the worker's next job.
    fn submit(
        &self,
        seq: u64,
        len: u64,
        scratch: Scratch,
        stop: &AtomicBool,
        write: &dyn Fn(&mut Scratch, u64) -> Result<()>,
    ) -> Result<Scratch> {
        let mut st = self.lock();
        // Wait for room, unless this is the job everyone waits for.
        while st.parked.len() >= self.limit && seq != st.next {
            if stop.load(Ordering::SeqCst) {
                return Ok(scratch);
            }
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.parked.insert(seq, (len, scratch));
        let result = if st.committing {
            Ok(())
        } else {
            st.committing = true;
            let mut result = Ok(());
            // Nothing more is written once a write failed (here or in an earlier committer):
            // a job parked after the failure would otherwise be written by the next committer,
            // and its error could be the one reported instead of the first.
            while let Some((len, mut job)) = {
                let next = st.next;
                match stop.load(Ordering::SeqCst) {
                    true => None,
                    false => st.parked.remove(&next),
                }
            } {
                drop(st);
                result = write(&mut job, len);
                st = self.lock();
                if result.is_err() {
                    // Set under the lock, before another worker can become the committer.
                    stop.store(true, Ordering::SeqCst);
                }
                st.next += 1;
                st.free.push(job);
                self.changed.notify_all();
                if result.is_err() || stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            st.committing = false;
            result
        };
        let fresh = st.free.pop().unwrap_or_default();
        drop(st);
        self.changed.notify_all();
        result.map(|()| fresh)
    }

    /// Wakes every waiter (after a failure).
    fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }
}

/// Copies all of `plan.src` into `plan.dst`.
pub(super) fn run(plan: &Plan<'_>, progress: Option<Progress<'_>>) -> Result<()> {
    let size = plan.src.virtual_size();
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let threads = plan.threads.max(1);
    let reorder = Reorder {
        state: Mutex::new(ReorderState::default()),
        changed: Condvar::new(),
        // One parked job per worker: enough to keep the workers busy while one writes (a
        // window of 2x the workers was no faster and raised peak memory by a third). A target
        // whose writes are the bottleneck (LUKS qcow2: encrypted under its write lock) needs
        // fewer: the next job is always ready, and more would only hold memory.
        // (Raw to LUKS qcow2, 2 GiB: peak RSS 28 MB with 4, 20 MB with 1, as fast.)
        limit: if plan.dst.serializes_writes() {
            1
        } else {
            threads
        },
    };
    let pace = Pace {
        rate: plan.rate,
        start: std::time::Instant::now(),
        bytes: Mutex::new(0),
    };
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        stop.store(true, Ordering::SeqCst);
        {
            let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        reorder.wake_all();
    };
    let report = |n: u64| {
        let d = done.fetch_add(n, Ordering::SeqCst) + n;
        if let Some(p) = progress {
            p(d, size);
        }
    };
    if let Some(p) = progress {
        p(0, size);
    }
    let (tx, rx) = mpsc::sync_channel::<(u64, Job)>(threads * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut scratch = Scratch::default();
                let write = |s: &mut Scratch, len: u64| {
                    commit(plan, s)?;
                    pace.account(len);
                    report(len);
                    Ok(())
                };
                loop {
                    let (seq, job) = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    if stop.load(Ordering::SeqCst) {
                        continue;
                    }
                    let r = prepare(plan, job, &mut scratch).and_then(|()| {
                        if plan.ordered {
                            let s = std::mem::take(&mut scratch);
                            scratch = reorder.submit(seq, job.len(), s, &stop, &write)?;
                            Ok(())
                        } else {
                            write(&mut scratch, job.len())
                        }
                    });
                    if let Err(e) = r {
                        fail(e);
                    }
                }
            });
        }
        let mut seq = 0u64;
        let mut send = |job: Job| -> bool {
            let ok = tx.send((seq, job)).is_ok();
            seq += 1;
            ok
        };
        let r = if plan.backing.is_some() {
            produce_against_backing(plan, &stop, &mut send, &report)
        } else {
            produce(plan, &stop, &mut send)
        };
        if let Err(e) = r {
            fail(e);
        }
        drop(tx);
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => match plan.compress {
            Some(q) => q.finish_compressed(),
            None => Ok(()),
        },
    }
}

/// Queues the jobs for a target without a backing file: data ranges in chunks, zero ranges as
/// zero jobs. Compressed copies work in whole clusters: a data range is widened to cluster
/// boundaries, and `emitted` remembers how far clusters were already queued so that no
/// cluster is handed to two workers.
fn produce(plan: &Plan<'_>, stop: &AtomicBool, send: &mut dyn FnMut(Job) -> bool) -> Result<()> {
    let src = plan.src;
    let size = src.virtual_size();
    let sparse = plan.sparse;
    let chunk = match CHUNK.checked_div(sparse) {
        Some(n) => n.max(1) * sparse,
        None => CHUNK,
    };
    let ccs = plan.compress.map(|_| plan.cluster);
    let mut emitted = 0u64;
    let mut off = 0;
    while off < size && !stop.load(Ordering::SeqCst) {
        let st = salvaged_status(plan, off, size)?;
        let end = off + st.len;
        if let Some(cs) = ccs {
            let step = compress_step(plan, cs);
            // With `-S 0` zero ranges are written too, compressed like data (as qemu-img
            // does: they read as zeros and are stored as tiny compressed clusters).
            let (o, stop_at, zero) = if st.zero && sparse != 0 {
                (off, end, true)
            } else {
                (
                    off / cs * cs,
                    end.div_ceil(cs).saturating_mul(cs).min(size),
                    false,
                )
            };
            let mut o = o.max(emitted);
            while o < stop_at {
                let n = (step - o % step).min(stop_at - o);
                let job = if zero {
                    Job::Zero { off: o, len: n }
                } else {
                    Job::Data { off: o, len: n }
                };
                if !send(job) {
                    return Ok(());
                }
                o += n;
            }
            if !zero {
                emitted = emitted.max(stop_at);
            }
        } else if st.zero {
            // Zero ranges are cheap whatever their size; still split them so progress moves
            // smoothly.
            let mut o = off;
            while o < end {
                let n = (end - o).min(64 * chunk);
                if !send(Job::Zero { off: o, len: n }) {
                    return Ok(());
                }
                o += n;
            }
        } else {
            // Chunks aligned to multiples of `chunk` in guest space, so that sparse blocks stay
            // aligned.
            let mut o = off;
            while o < end {
                let n = (chunk - o % chunk).min(end - o);
                if !send(Job::Data { off: o, len: n }) {
                    return Ok(());
                }
                o += n;
            }
        }
        off = end;
    }
    Ok(())
}

/// Guest bytes of one job of a compressed copy into clusters of `cs` bytes: small jobs, as
/// compression works cluster by cluster and big buffers only cost memory; a single cluster
/// when the target appends one at a time under its lock (a stream-optimized VMDK), where every
/// job waiting to be appended holds its buffer (2 GiB qcow2 to streamOptimized on 2 cores:
/// peak RSS 9.5 MB with 256 KiB jobs, 8.2 MB with a 64 KiB grain each).
fn compress_step(plan: &Plan<'_>, cs: u64) -> u64 {
    match plan.dst.serializes_writes() {
        true => cs,
        false => COMPRESS_CHUNK.max(cs),
    }
}

/// The source's block status at `off`; with `--salvage`, a failure is warned about (as qemu-img
/// does) and the next 512 bytes are treated as data, to be read (or zero-filled) like any other.
fn salvaged_status(plan: &Plan<'_>, off: u64, size: u64) -> Result<BlockStatus> {
    match status(plan.src, off, size) {
        Err(e) if plan.salvage => {
            if !plan.quiet {
                eprintln!(
                    "vimg: warning: error while reading block status at offset {off}: \
                     Input/output error ({e})"
                );
            }
            Ok(BlockStatus {
                len: 512.min(size - off),
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: None,
            })
        }
        r => r,
    }
}

/// What to do with a run of target clusters when the target has a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Leave unallocated: the backing file already reads the same.
    Skip,
    /// The source reads zeros, the backing file may not: zero clusters.
    Zero,
    /// Copy (with `-S 0`, where nothing is compared).
    Data,
    /// Read both and compare cluster by cluster.
    Compare,
}

/// Classifies the target cluster at `c` (aligned) from block status alone; returns the
/// decision and how far it holds (at least to the end of the cluster; further when one status
/// range covers several whole clusters).
fn classify(
    plan: &Plan<'_>,
    src: &mut Cursor<'_>,
    bk: &mut Cursor<'_>,
    c: u64,
    size: u64,
) -> Result<(Decision, u64)> {
    let cs = plan.cluster;
    let cend = (c + cs).min(size);
    let (mut all_inherit, mut skip, mut all_zero) = (true, true, true);
    let mut first_end = None;
    let mut pos = c;
    while pos < cend {
        let (s, mut end) = src.at(pos)?;
        // Answered at or below the layer that is the new backing file; or unallocated all the
        // way down to just above it, past its end (where the new backing reads zeros too).
        let inherit = plan
            .inherit_depth
            .is_some_and(|k| s.depth >= k || (!s.present && s.depth + 1 == k));
        // Zeros over zeros need no writing; with `-S 0` (everything written) only past the
        // backing file's end, as qemu-img does it.
        let mut zero_over_zero = false;
        if !inherit && s.zero {
            let (b, bend) = bk.at(pos)?;
            zero_over_zero = b.zero && (plan.sparse != 0 || pos >= bk.image().virtual_size());
            end = end.min(bend);
        }
        first_end.get_or_insert(end);
        all_inherit &= inherit;
        skip &= inherit || zero_over_zero;
        all_zero &= !inherit && s.zero;
        pos = end.min(cend);
    }
    let decision = if all_inherit || skip {
        Decision::Skip
    } else if all_zero {
        Decision::Zero
    } else if plan.sparse == 0 {
        Decision::Data
    } else {
        Decision::Compare
    };
    let first_end = first_end.unwrap_or(cend).min(size);
    let run_end = if first_end >= size {
        size
    } else if first_end >= cend {
        (first_end / cs * cs).max(cend)
    } else {
        cend
    };
    Ok((decision, run_end))
}

/// Queues the jobs for a target with a backing file: runs of target clusters are classified by
/// block status (see [`classify`]); skipped runs only advance the progress.
fn produce_against_backing(
    plan: &Plan<'_>,
    stop: &AtomicBool,
    send: &mut dyn FnMut(Job) -> bool,
    report: &dyn Fn(u64),
) -> Result<()> {
    let Some(backing) = plan.backing else {
        return Ok(());
    };
    let size = plan.src.virtual_size();
    let cs = plan.cluster;
    let step = if plan.compress.is_some() {
        compress_step(plan, cs)
    } else {
        CHUNK.max(cs)
    };
    let mut src = Cursor::new(plan.src);
    let mut bk = Cursor::new(backing);
    // An existing target (`-n`) may hold data of its own over the backing file: there, what
    // the backing file holds does not show through, so the source is copied.
    let mut own = plan.zero_needed.then(|| Cursor::new(plan.dst));
    let mut c = 0u64;
    // The run being gathered: decision, start, end.
    let mut run: Option<(Decision, u64, u64)> = None;
    let flush = |run: (Decision, u64, u64), send: &mut dyn FnMut(Job) -> bool| -> bool {
        let (d, start, end) = run;
        if d == Decision::Skip {
            report(end - start);
            return true;
        }
        let mut o = start;
        while o < end {
            let n = (step - o % step).min(end - o);
            let job = match d {
                Decision::Zero => Job::Zero { off: o, len: n },
                Decision::Data => Job::Data { off: o, len: n },
                _ => Job::Compare { off: o, len: n },
            };
            if !send(job) {
                return false;
            }
            o += n;
        }
        true
    };
    while c < size && !stop.load(Ordering::SeqCst) {
        let (mut d, mut end) = classify(plan, &mut src, &mut bk, c, size)?;
        if let Some(t) = own
            .as_mut()
            .filter(|_| matches!(d, Decision::Skip | Decision::Compare))
        {
            let (owned, owned_end) = target_owns(t, c, cs, size)?;
            end = end.min(owned_end);
            if owned {
                d = Decision::Data;
            }
        }
        run = match run {
            Some((rd, rs, _)) if rd == d && end - rs <= 64 * step => Some((rd, rs, end)),
            Some(r) => {
                if !flush(r, send) {
                    return Ok(());
                }
                Some((d, c, end))
            }
            None => Some((d, c, end)),
        };
        c = end;
    }
    if let Some(r) = run {
        if !stop.load(Ordering::SeqCst) {
            flush(r, send);
        }
    }
    Ok(())
}

/// Whether the target cluster at `c` (aligned) holds anything in the target's own layer, and
/// how far (in whole clusters, at least to the end of this one) that answer holds.
fn target_owns(t: &mut Cursor<'_>, c: u64, cs: u64, size: u64) -> Result<(bool, u64)> {
    let cend = (c + cs).min(size);
    let own = |s: &BlockStatus| s.present && s.depth == 0;
    let (first, first_end) = t.at(c)?;
    let mut owned = own(&first);
    let mut pos = first_end;
    while !owned && pos < cend {
        let (s, e) = t.at(pos)?;
        owned = own(&s);
        pos = e;
    }
    let run_end = if own(&first) {
        first_end.div_ceil(cs).saturating_mul(cs)
    } else if !owned {
        (first_end / cs * cs).max(cend)
    } else {
        cend
    };
    Ok((owned, run_end.clamp(cend, size)))
}

/// Turns `job` into actions in `s.actions` (reading into `s.buf`).
fn prepare(plan: &Plan<'_>, job: Job, s: &mut Scratch) -> Result<()> {
    s.actions.clear();
    match job {
        Job::Zero { off, len } => {
            if plan.sparse == 0 {
                s.actions.push(Action::Fill { off, len });
            } else if plan.zero_needed || plan.backing.is_some() {
                s.actions.push(Action::Zero { off, len });
            }
            Ok(())
        }
        Job::Data { off, len } => {
            if offload(plan, off, len, &mut s.actions)? {
                return Ok(());
            }
            s.buf.resize(len as usize, 0);
            read_source(plan, &mut s.buf, off)?;
            // Each range is read once: a device source need not keep it cached.
            plan.src.done_reading(GuestOffset(off), len);
            match plan.compress {
                Some(q) => store_clusters(plan, q, off, 0, len as usize, s),
                None => {
                    plan_sparse_writes(plan, off, len, &s.buf, &mut s.actions);
                    Ok(())
                }
            }
        }
        Job::Compare { off, len } => {
            let Some(backing) = plan.backing else {
                return Ok(());
            };
            s.buf.resize(len as usize, 0);
            s.backing.resize(len as usize, 0);
            read_source(plan, &mut s.buf, off)?;
            plan.src.done_reading(GuestOffset(off), len);
            read_clamped(backing, &mut s.backing, off)?;
            let cs = plan.cluster as usize;
            // Runs of clusters that differ from the backing file and are not all zeros.
            let mut data_run: Option<usize> = None;
            let mut i = 0usize;
            while i < len as usize {
                let n = cs.min(len as usize - i);
                let piece = &s.buf[i..i + n];
                let differs = piece != &s.backing[i..i + n];
                let zero = differs && is_zero(piece);
                if differs && !zero {
                    data_run.get_or_insert(i);
                } else {
                    if let Some(start) = data_run.take() {
                        store_run(plan, off, start, i, s)?;
                    }
                    if zero {
                        s.actions.push(Action::Zero {
                            off: off + i as u64,
                            len: n as u64,
                        });
                    }
                }
                i += n;
            }
            if let Some(start) = data_run {
                store_run(plan, off, start, len as usize, s)?;
            }
            Ok(())
        }
    }
}

/// The layer at `depth` below `img` (0: `img` itself).
fn layer(img: &dyn BlockImage, depth: u32) -> Option<&dyn BlockImage> {
    let mut l = img;
    for _ in 0..depth {
        l = l.backing()?;
    }
    Some(l)
}

/// With `-C`: queues the in-kernel copy of the data job `[off, off + len)` when every range of
/// it is stored as it is in a host file of the source (see [`BlockImage::copyable_data`]) and
/// the target holds its guest data at its own offsets ([`BlockImage::linear_storage`]).
/// Returns whether it did; otherwise the job is read and written. As qemu-img stops offloading
/// at the first range it cannot offload (a compressed cluster, a format that cannot say where
/// its data is, a kernel that refuses), that range and all later ones are then written with
/// zero detection, as without `-C` (ranges offloaded already stay as they are).
fn offload(plan: &Plan<'_>, off: u64, len: u64, out: &mut Vec<Action>) -> Result<bool> {
    if !plan.verbatim
        || plan.compress.is_some()
        || plan.joined
        || plan.offload_failed.load(Ordering::Relaxed)
    {
        return Ok(false);
    }
    // qemu offloads into raw files and qcow2 images only (vimg copies into qcow2 with its own
    // writes, data ranges whole as qemu's offloaded copy leaves them); into anything else
    // (vpc, vdi, vhdx, vmdk) it fails at once.
    let linear = plan.dst.linear_storage().is_some();
    if !linear && plan.dst.format().as_str() != "qcow2" {
        plan.offload_failed.store(true, Ordering::Relaxed);
        return Ok(false);
    }
    let start = out.len();
    let end = off + len;
    let mut pos = off;
    while pos < end {
        let st = status(plan.src, pos, end)?;
        let stored = layer(plan.src, st.depth).and_then(|l| l.copyable_data());
        let host = match st.offset {
            Some(h) if st.data && !st.compressed && stored.is_some() => h.0,
            _ => {
                out.truncate(start);
                plan.offload_failed.store(true, Ordering::Relaxed);
                return Ok(false);
            }
        };
        out.push(Action::CopyRange {
            off: pos,
            len: st.len,
            host,
            depth: st.depth,
        });
        pos += st.len;
    }
    if !linear {
        out.truncate(start);
    }
    Ok(linear)
}

/// Carries out a [`Action::CopyRange`]: inside the kernel if it can; else (and from then on
/// for the whole copy, see [`offload`]) by reading into `buf` and writing, with zero detection.
fn copy_range(
    plan: &Plan<'_>,
    (off, len, host, depth): (u64, u64, u64, u32),
    buf: &mut AlignedBuf,
    actions: &mut Vec<Action>,
    zeros: &mut AlignedBuf,
) -> Result<()> {
    let src = layer(plan.src, depth).and_then(|l| l.copyable_data());
    if let (Some(src), Some(dst), false) = (
        src,
        plan.dst.linear_storage(),
        plan.offload_failed.load(Ordering::Relaxed),
    ) {
        let copied = dst.copy_range_from(src, host, off, len).map_err(|e| {
            let e = Error::io("copy_file_range failed", e)
                .with_path(plan.dst.filename())
                .at(off);
            writing(e, &Action::Zero { off, len })
        })?;
        if copied {
            return Ok(());
        }
        plan.offload_failed.store(true, Ordering::Relaxed);
    }
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK - pos % CHUNK);
        buf.resize(n as usize, 0);
        read_source(plan, buf, pos)?;
        actions.clear();
        plan_sparse_writes(plan, pos, n, buf, actions);
        for a in actions.iter() {
            commit_one(plan, plan.dst, a, zeros, buf).map_err(|e| writing(e, a))?;
        }
        pos += n;
    }
    Ok(())
}

/// Queues the storing of `s.buf[start..end]` (whole clusters at guest offset `off + start`).
fn store_run(plan: &Plan<'_>, off: u64, start: usize, end: usize, s: &mut Scratch) -> Result<()> {
    match plan.compress {
        Some(q) => store_clusters(plan, q, off, start, end, s),
        None => {
            s.actions.push(Action::Write {
                off: off + start as u64,
                at: start,
                len: end - start,
            });
            Ok(())
        }
    }
}

/// Queues `s.buf[start..end]`, whole clusters at guest offset `off + start`, compressed where
/// that saves space; all-zero clusters are left out (or, with a backing file, made zero
/// clusters).
fn store_clusters(
    plan: &Plan<'_>,
    q: &dyn CompressedWrites,
    off: u64,
    start: usize,
    end: usize,
    s: &mut Scratch,
) -> Result<()> {
    let cs = plan.cluster as usize;
    let mut cluster = std::mem::take(&mut s.cluster);
    cluster.resize(cs, 0);
    let r = compress_clusters(plan, q, off, start, end, s, &mut cluster);
    s.cluster = cluster;
    r
}

/// [`store_clusters`] with its cluster buffer (`cluster.len()` is the cluster size).
fn compress_clusters(
    plan: &Plan<'_>,
    q: &dyn CompressedWrites,
    off: u64,
    start: usize,
    end: usize,
    s: &mut Scratch,
    cluster: &mut [u8],
) -> Result<()> {
    let cs = cluster.len();
    let mut i = start;
    while i < end {
        let n = cs.min(end - i);
        let piece = &s.buf[i..i + n];
        let gc = off + i as u64;
        // `-S 0` writes every cluster, zeros included (compressed, as qemu-img does).
        if is_zero(piece) && plan.sparse != 0 {
            if plan.backing.is_some() {
                s.actions.push(Action::Zero {
                    off: gc,
                    len: n as u64,
                });
            }
        } else {
            // The last cluster of a disk whose size is not a multiple of the cluster size is
            // compressed whole, padded with zeros, as qemu does.
            cluster[..n].copy_from_slice(piece);
            cluster[n..].fill(0);
            match q.compress(cluster)? {
                Some(z) => s.actions.push(Action::Compressed { gc, z }),
                None => s.actions.push(Action::Write {
                    off: gc,
                    at: i,
                    len: n,
                }),
            }
        }
        i += n;
    }
    Ok(())
}

/// Queues writes of `buf` (guest data at `off`), leaving out (or, when zeros must be written,
/// zeroing) the aligned blocks of `plan.sparse` bytes that are all zeros.
fn plan_sparse_writes(plan: &Plan<'_>, off: u64, len: u64, buf: &[u8], out: &mut Vec<Action>) {
    let sparse = plan.sparse;
    // `-C` copies data ranges whole, as qemu's offloaded copy does, until offloading failed.
    if sparse == 0 || (plan.verbatim && !plan.offload_failed.load(Ordering::Relaxed)) {
        out.push(Action::Write {
            off,
            at: 0,
            len: len as usize,
        });
        return;
    }
    // Walk the blocks, grouping maximal runs of non-zero blocks and of zero blocks.
    let end = off + len;
    let mut pos = off;
    let slice = |a: u64, b: u64| &buf[(a - off) as usize..(b - off) as usize];
    while pos < end {
        let block_end = ((pos / sparse + 1) * sparse).min(end);
        let zero = is_zero(slice(pos, block_end));
        let mut run_end = block_end;
        while run_end < end {
            let next_end = (run_end + sparse).min(end);
            if zero != is_zero(slice(run_end, next_end)) {
                break;
            }
            run_end = next_end;
        }
        if !zero {
            out.push(Action::Write {
                off: pos,
                at: (pos - off) as usize,
                len: (run_end - pos) as usize,
            });
        } else if plan.zero_needed {
            out.push(Action::Zero {
                off: pos,
                len: run_end - pos,
            });
        }
        pos = run_end;
    }
}

/// Carries out the actions `prepare` queued.
fn commit(plan: &Plan<'_>, s: &mut Scratch) -> Result<()> {
    let dst = plan.dst;
    let mut fallback = Vec::new();
    for a in &s.actions {
        match *a {
            Action::CopyRange {
                off,
                len,
                host,
                depth,
            } => copy_range(
                plan,
                (off, len, host, depth),
                &mut s.buf,
                &mut fallback,
                &mut s.zeros,
            )?,
            _ => commit_one(plan, dst, a, &mut s.zeros, &s.buf).map_err(|e| writing(e, a))?,
        }
    }
    Ok(())
}

/// A failed write to the target in qemu-img's words first (`error while writing at byte N`,
/// N the guest offset), then vimg's (what failed, where in the file, the OS cause).
fn writing(e: Error, a: &Action) -> Error {
    let off = match a {
        Action::Write { off, .. }
        | Action::Zero { off, .. }
        | Action::Fill { off, .. }
        | Action::CopyRange { off, .. } => *off,
        Action::Compressed { gc, .. } => *gc,
    };
    if e.kind() != ErrorKind::Io {
        return e;
    }
    let what = format!("error while writing at byte {off}: {}", e.what());
    e.reworded(what)
}

fn commit_one(
    plan: &Plan<'_>,
    dst: &dyn BlockImage,
    a: &Action,
    zeros: &mut AlignedBuf,
    buf: &[u8],
) -> Result<()> {
    match a {
        Action::Write { off, at, len } => dst.write_at(&buf[*at..at + len], GuestOffset(*off))?,
        Action::Zero { off, len } => dst.write_zeroes(GuestOffset(*off), *len, true)?,
        Action::Fill { off, len } => {
            if zeros.is_empty() {
                zeros.resize(CHUNK as usize, 0);
            }
            let mut pos = *off;
            while pos < off + len {
                let n = (off + len - pos).min(CHUNK);
                dst.write_at(&zeros[..n as usize], GuestOffset(pos))?;
                pos += n;
            }
        }
        // Carried out by `commit` (it needs a buffer to fall back on).
        Action::CopyRange { .. } => {
            return Err(Error::invalid_input("in-kernel copy outside a commit"))
        }
        Action::Compressed { gc, z } => match plan.compress {
            Some(q) => q.write_compressed(GuestOffset(*gc), z)?,
            None => {
                return Err(Error::invalid_input(
                    "compressed write without a compressing target",
                ))
            }
        },
    }
    Ok(())
}
