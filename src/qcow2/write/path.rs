//! The qcow2 write path (qcow2.rst "Cluster mapping" and "Cluster refcounts"): allocating
//! writes with copy-on-write, zero writes, and a flush whose order keeps the image consistent
//! whenever it is interrupted.
//!
//! # Crash safety
//!
//! Metadata changes (refcount blocks, the refcount table, L2 tables, the L1 table) are made in
//! memory (the dirty tables of [`TableCache`]) and written by
//! `BlockImage::flush` in this order, with a sync after each step:
//!
//! 1. refcount blocks and the refcount table (new clusters now have refcount 1 on disk);
//! 2. the header's refcount table pointer, if the table moved;
//! 3. L2 tables, then the L1 table (they now point at clusters whose refcounts are on disk);
//! 4. refcount *decrements*: a cluster a write stopped using (copy-on-write of a shared or
//!    compressed cluster, an unmapping zero write) is only released here, after no table on
//!    disk points at it any more; until then it is not reused.
//!
//! Guest data is written to its cluster before the table entry pointing at it changes, so a
//! crash at any moment leaves at worst clusters whose refcount is too high (leaks, which
//! `qemu-img check -r leaks` repairs), never a table pointing at a free or foreign cluster.
//! A freed cluster that a discard released is also handed back to the host file system (a hole
//! is punched) once its refcount reaches 0 in step 4.
//!
//! # Lazy refcounts
//!
//! When the image enables lazy refcounts (qcow2.rst, compatible feature bit 0), the first flush
//! that has metadata to write sets the dirty bit (incompatible feature bit 0) and syncs before
//! anything else. From then on steps 1 and 4 keep refcount blocks in memory: they are written only
//! when the refcount structure changes (a new refcount block or a moved table, written at once so
//! that a repair after a crash finds every block it needs), when too many are dirty (more than 256,
//! or than 16 MiB of them), and at a clean close ([`Qcow2Image::close`] or the drop), which writes
//! them all, syncs, clears the dirty bit and syncs. L2 and L1 tables are still written at every
//! flush, after the data they point at, and the deferred release still waits for them, so the
//! refcounts on disk of a dirty image are only ever too low for clusters allocated since they were
//! last written, or too high for freed ones: a crash leaves an image that reads correctly and that
//! a read-write open (by vimg or qemu) repairs. COPIED flags are always set from the refcounts in
//! memory, which are exact.

use crate::error::{Error, ErrorKind, Result};
use crate::qcow2::cache::TableCache;
use crate::qcow2::format::header::{fields, incompat, Header};
use crate::qcow2::format::l2::{self, Descriptor, Slot, L1E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use crate::qcow2::refcount::table::{
    self as refcount, get_refcount, set_refcount, REFT_OFFSET_MASK,
};
use crate::qcow2::Qcow2Image;
use byteorder::{BigEndian, ByteOrder};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Dirty tables at which a write flushes by itself, bounding memory.
const MAX_DIRTY_TABLES: usize = 512;
/// With lazy refcounts, dirty refcount blocks at which a flush writes them anyway (well below
/// [`MAX_DIRTY_TABLES`], so that flushing keeps up) ...
const LAZY_MAX_DIRTY_REFBLOCKS: usize = 256;
/// ... or fewer, so that they hold at most this many bytes (at least 4 blocks).
const LAZY_MAX_DIRTY_REFBLOCK_BYTES: u64 = 16 << 20;
/// Most bytes a write encrypts at a time (whole sectors), through
/// [`WriteState::crypt_buf`]: encrypting a whole 2 MiB run into a copy of its own cost a fresh
/// 2 MiB buffer per run, which each writing thread's allocator arena then kept (the peak RSS
/// of a LUKS convert was ~10 MB above a plain one).
const CRYPT_PIECE: usize = 512 << 10;
/// Subcluster bitmap with every subcluster allocated (extended L2).
const ALL_ALLOCATED: u64 = 0x0000_0000_ffff_ffff;
/// Subcluster bitmap with every subcluster reading as zero (extended L2).
pub(in crate::qcow2) const ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// An L2 entry about to change: where it is and what it says now.
#[derive(Debug, Clone, Copy)]
struct L2Slot {
    /// Host offset of the (writable) L2 table.
    l2_off: u64,
    /// Index of the entry's first word in the table.
    idx: usize,
    /// The entry's standard word.
    entry: u64,
    /// The subcluster bitmap (extended L2).
    bitmap: u64,
    /// `entry` decoded.
    desc: Descriptor,
}

/// What [`Qcow2Image::write_in_cluster`] left to its caller.
enum Deferred {
    /// Nothing: the write is done.
    Nothing,
    /// The data is to be written at host offset `host` (in place, in a cluster the image owns
    /// alone: no table changes).
    Data { host: u64 },
    /// The data (a whole cluster) is to be written at `host`, then `mapping` applied.
    Mapped { host: u64, mapping: Remap },
}

/// An L2 entry to point at a new cluster once its data is written.
struct Remap {
    /// The L2 table's host offset.
    l2_off: u64,
    /// The entry's index in the table (in words).
    idx: usize,
    /// The new entry.
    entry: u64,
    /// The new subcluster bitmap (extended L2 only).
    bitmap: Option<u64>,
    /// What the entry pointed at before, released at the next flush.
    release: Option<Descriptor>,
    /// The new cluster was allocated for this write (refcount 1, nothing pointing at it yet):
    /// if its data cannot be written it is handed back (see [`Qcow2Image::abandon`]).
    fresh: bool,
}

/// The mutable state of an image opened for writing, behind the image's write lock.
#[derive(Debug)]
pub(crate) struct WriteState {
    /// The refcount table as it will be written (entries: refcount block offsets).
    pub(in crate::qcow2) reftable: Vec<u64>,
    /// Where the refcount table lives (moves when it grows).
    reftable_offset: u64,
    reftable_dirty: bool,
    /// The table moved: the header must point at it, and the old one is freed afterwards.
    old_reftable: Option<(u64, u64)>,
    /// Host clusters whose refcount drops once the tables no longer pointing at them are on disk.
    pub(in crate::qcow2) pending_free: Vec<u64>,
    /// Where the search for a free cluster starts.
    free_hint: u64,
    pub(in crate::qcow2) l1_dirty: bool,
    /// Host clusters holding metadata, which data writes must never touch.
    pub(in crate::qcow2) metadata: HashSet<u64>,
    /// Refcount blocks, cached; the dirty ones are written at flush.
    refblocks: TableCache<u8>,
    /// Where the next compressed cluster goes: the first free byte after the last one, so that
    /// compressed clusters are packed densely.
    compressed_tail: Option<u64>,
    /// Lazy refcounts (qcow2.rst, compatible feature bit 0) are in use: refcount blocks are
    /// written only when the refcount structure changes, when too many are dirty, and at close.
    pub(in crate::qcow2) lazy: bool,
    /// This session set the dirty bit (incompatible feature bit 0) on disk.
    marked_dirty: bool,
    /// Host clusters released by a discard, whose space is handed back to the host file
    /// system (a hole is punched) once their refcount reaches 0.
    pub(in crate::qcow2) punch: HashSet<u64>,
    /// Dirty tracking of the persistent bitmaps (inactive until the open starts it).
    pub(in crate::qcow2) bitmaps: crate::qcow2::bitmap::tracker::Tracker,
    /// When set, the clusters `alloc_run` allocates are noted here, so that an operation
    /// failing half way (a full block device) can free them again with [`Qcow2Image::unallocate`].
    pub(in crate::qcow2) alloc_log: Option<Vec<u64>>,
    /// Where data that is not encrypted yet is encrypted before it is written, at most
    /// [`CRYPT_PIECE`] bytes at a time (allocated at the first encrypted write, then reused).
    crypt_buf: Vec<u8>,
}

impl WriteState {
    /// Builds the write state of `img` (just opened read-write): its refcount table and the set
    /// of metadata clusters.
    pub(crate) fn new(img: &Qcow2Image) -> Result<Self> {
        let h = img.header();
        let table = refcount::RefcountTable::read(img)?;
        // Every metadata cluster, refusing images whose structures overlap (see
        // [`crate::qcow2::format::layout`]).
        let metadata =
            crate::qcow2::format::layout::MetadataMap::build(img, Some(table.entries()))?
                .clusters();
        Ok(WriteState {
            reftable: table.entries().to_vec(),
            reftable_offset: h.refcount_table_offset,
            reftable_dirty: false,
            old_reftable: None,
            pending_free: Vec::new(),
            free_hint: 0,
            l1_dirty: false,
            metadata,
            refblocks: TableCache::new(64),
            compressed_tail: None,
            lazy: false,
            marked_dirty: false,
            punch: HashSet::new(),
            bitmaps: Default::default(),
            alloc_log: None,
            crypt_buf: Vec::new(),
        })
    }
}

impl Qcow2Image {
    fn io_err(what: &str, off: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |e| Error::io(what.to_string(), e).at(off)
    }

    /// log2 of the refcounts per refcount block.
    pub(in crate::qcow2) fn refblock_bits(&self) -> u32 {
        self.header.cluster_bits + 3 - self.header.refcount_order
    }

    /// The refcount block at `off`, through the cache.
    fn refblock(&self, st: &WriteState, off: u64) -> Result<Arc<[u8]>> {
        st.refblocks.get_or_load(off, || self.load_refblock(off))
    }

    /// Reads the refcount block at `off` from the file.
    fn load_refblock(&self, off: u64) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; self.header.cluster_size() as usize];
        refcount::read_padded(self, &mut raw, off)?;
        Ok(raw)
    }

    /// The refcount of host cluster `cluster`, as it will be after the next flush.
    pub(in crate::qcow2) fn refcount_of(&self, st: &WriteState, cluster: u64) -> Result<u64> {
        let bits = self.refblock_bits();
        let idx = (cluster >> bits) as usize;
        let off = st.reftable.get(idx).map_or(0, |e| e & REFT_OFFSET_MASK);
        if off == 0 {
            return Ok(0);
        }
        let block = self.refblock(st, off)?;
        Ok(get_refcount(
            &block,
            cluster & ((1 << bits) - 1),
            self.header.refcount_order,
        ))
    }

    /// Sets the refcount of host cluster `cluster`, creating its refcount block if needed.
    pub(in crate::qcow2) fn set_refcount_of(
        &self,
        st: &mut WriteState,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        if value > refcount::max_refcount(self.header.refcount_order) {
            return Err(Error::unsupported(format!(
                "refcount of cluster {cluster} would exceed the {}-bit refcount width",
                self.header.refcount_bits()
            )));
        }
        let bits = self.refblock_bits();
        let off = self.ensure_refblock(st, cluster >> bits, 0)?;
        let order = self.header.refcount_order;
        st.refblocks.modify(
            off,
            || self.load_refblock(off),
            |block| set_refcount(block, cluster & ((1 << bits) - 1), order, value),
        )
    }

    /// The offset of refcount block `idx`, allocating it (and growing the refcount table) if it
    /// does not exist. `depth` bounds the recursion a new block's own refcount can cause.
    fn ensure_refblock(&self, st: &mut WriteState, idx: u64, depth: u32) -> Result<u64> {
        if depth > 8 {
            return Err(Error::corrupt("cannot place a new refcount block"));
        }
        if idx as usize >= st.reftable.len() {
            self.grow_reftable(st, idx + 1)?;
        }
        let existing = st.reftable[idx as usize] & REFT_OFFSET_MASK;
        if existing != 0 {
            return Ok(existing);
        }
        let cs = self.header.cluster_size();
        let c = self.find_free(st, 1, false)?;
        let off = c * cs;
        st.reftable[idx as usize] = off;
        st.reftable_dirty = true;
        st.metadata.insert(c);
        st.refblocks.put_dirty(off, vec![0u8; cs as usize].into());
        self.note_end(c + 1);
        // The new block's own refcount lives in whichever block covers its cluster.
        let bits = self.refblock_bits();
        let own = self.ensure_refblock(st, c >> bits, depth + 1)?;
        let mut block = self.refblock(st, own)?.to_vec();
        set_refcount(
            &mut block,
            c & ((1 << bits) - 1),
            self.header.refcount_order,
            1,
        );
        st.refblocks.put_dirty(own, block.into());
        Ok(off)
    }

    /// Grows the in-memory refcount table to at least `min_entries` entries (with room to
    /// spare) and moves it to newly allocated clusters; the header is updated at flush.
    fn grow_reftable(&self, st: &mut WriteState, min_entries: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        let old_entries = st.reftable.len() as u64;
        let want = min_entries
            .max(old_entries * 3 / 2)
            .max(old_entries + cs / 8)
            + 2;
        let clusters = (want * 8).div_ceil(cs);
        if clusters * cs > crate::qcow2::format::header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                "the refcount table would exceed qemu's 8 MiB limit",
            ));
        }
        let old = (st.reftable_offset, old_entries * 8);
        st.reftable.resize((clusters * cs / 8) as usize, 0);
        let first = self.find_free(st, clusters, true)?;
        for c in first..first + clusters {
            st.metadata.insert(c);
            self.set_refcount_of(st, c, 1)?;
        }
        self.note_end(first + clusters);
        // A table that moved twice before a flush: the intermediate copy was never written
        // nor pointed at, so only the on-disk one is freed later.
        if st.old_reftable.is_none() {
            st.old_reftable = Some(old);
        } else {
            for c in (st.reftable_offset / cs)..(st.reftable_offset / cs + (old.1).div_ceil(cs)) {
                st.pending_free.push(c);
            }
        }
        st.reftable_offset = first * cs;
        st.reftable_dirty = true;
        Ok(())
    }

    /// The first run of `n` free host clusters at or after the free hint. With `with_blocks`,
    /// the refcount blocks covering the run exist when it returns (creating one may take a
    /// cluster of the candidate run, in which case the search goes on), so that setting the
    /// run's refcounts allocates nothing more. Placing a refcount block itself passes `false`.
    pub(in crate::qcow2) fn find_free(
        &self,
        st: &mut WriteState,
        n: u64,
        with_blocks: bool,
    ) -> Result<u64> {
        let mut start = st.free_hint;
        let limit = (1u64 << 56) >> self.header.cluster_bits;
        let bits = self.refblock_bits();
        loop {
            if start + n > limit {
                return Err(Error::new(
                    ErrorKind::Io,
                    "no free cluster left in the image",
                ));
            }
            let mut busy = None;
            for c in start..start + n {
                if self.refcount_of(st, c)? != 0 || st.metadata.contains(&c) {
                    busy = Some(c);
                    break;
                }
            }
            if let Some(c) = busy {
                start = c + 1;
                continue;
            }
            if with_blocks {
                let mut created = false;
                for idx in (start >> bits)..=((start + n - 1) >> bits) {
                    let missing = st
                        .reftable
                        .get(idx as usize)
                        .is_none_or(|e| e & REFT_OFFSET_MASK == 0);
                    if missing {
                        self.ensure_refblock(st, idx, 0)?;
                        created = true;
                    }
                }
                if created {
                    continue; // look at the same candidate again
                }
            }
            if n == 1 {
                st.free_hint = start + 1;
            }
            return Ok(start);
        }
    }

    /// Allocates one host cluster for guest data or an L2 table (refcount 1).
    fn alloc_cluster(&self, st: &mut WriteState) -> Result<u64> {
        loop {
            let c = self.find_free(st, 1, true)?;
            self.set_refcount_of(st, c, 1)?;
            // Creating the refcount block may have taken this very cluster.
            if !st.metadata.contains(&c) {
                self.note_end(c + 1);
                return Ok(c);
            }
        }
    }

    /// Records that the file now extends to at least cluster `end`.
    pub(in crate::qcow2) fn note_end(&self, end: u64) {
        self.file_len
            .fetch_max(end << self.header.cluster_bits, Ordering::AcqRel);
    }

    /// Queues the host clusters `desc` refers to for release at the next flush.
    pub(in crate::qcow2) fn release(&self, st: &mut WriteState, desc: Descriptor) {
        if self.data_file.is_some() {
            return; // data file clusters are not refcounted
        }
        let bits = self.header.cluster_bits;
        match desc {
            Descriptor::Normal(h) | Descriptor::Zero(Some(h)) => st.pending_free.push(h >> bits),
            Descriptor::Compressed(d) => {
                let (a, b) = d.host_clusters(bits);
                st.pending_free.extend(a..=b);
            }
            _ => {}
        }
    }

    /// The L2 table for L1 index `l1_idx`, made private to the active L1 (allocated if missing,
    /// copied if shared with a snapshot). Returns its host offset.
    pub(in crate::qcow2) fn writable_l2(&self, st: &mut WriteState, l1_idx: usize) -> Result<u64> {
        let cs = self.header.cluster_size();
        let entry = self.l1()[l1_idx];
        let off = l2::l1_entry_target(entry, cs)?;
        if let (Some(off), true) = (off, entry & OFLAG_COPIED != 0) {
            return Ok(off);
        }
        let c = self.alloc_cluster(st)?;
        st.metadata.insert(c);
        let new_off = c * cs;
        let table: Vec<u64> = match off {
            None => vec![0; (cs / 8) as usize],
            Some(old) => {
                // Shared with a snapshot. A cluster's refcount counts the L1 tables it is
                // reachable through, so the clusters this table points at keep theirs (the
                // active L1 reaches them through the copy now); their COPIED flags stay clear.
                // Only the old table loses the active L1's reference.
                let t = self.l2_table(old)?.to_vec();
                st.pending_free.push(old / cs);
                t
            }
        };
        self.l2_cache.put_dirty(new_off, table.into());
        self.l1.write().unwrap_or_else(|e| e.into_inner())[l1_idx] = new_off | OFLAG_COPIED;
        st.l1_dirty = true;
        Ok(new_off)
    }

    /// Refuses a data write to host offset `host` that would overwrite metadata, marking the
    /// image corrupt as qemu does; also one into a cluster that starts past the end of the file
    /// (an L2 entry pointing there is corrupt, and writing would grow the file to it), which
    /// marks the image corrupt too.
    fn guard_data_write(&self, st: &WriteState, host: u64, len: u64) -> Result<()> {
        if self.data_file.is_some() {
            return Ok(());
        }
        let cs = self.header.cluster_size();
        if host / cs >= self.file_len().div_ceil(cs) {
            let _ = self.set_incompat_bit(incompat::CORRUPT);
            return Err(Error::corrupt(format!(
                "refusing a data write at {host:#x}: the data cluster lies beyond the end of the file ({} bytes; the image is now marked corrupt)",
                self.file_len()
            ))
            .at(host));
        }
        if (host / cs..(host + len).div_ceil(cs)).any(|c| st.metadata.contains(&c)) {
            let _ = self.set_incompat_bit(incompat::CORRUPT);
            return Err(Error::corrupt(format!(
                "refusing a data write at {host:#x}: it would overwrite metadata (the image is now marked corrupt)"
            ))
            .at(host));
        }
        Ok(())
    }

    /// Sets an incompatible feature bit in the header on disk (v3 images), and syncs.
    fn set_incompat_bit(&self, bit: u64) -> Result<()> {
        self.update_incompat_bits(bit, 0)
    }

    /// Sets the incompatible feature bits `set` and clears those in `clear` in the header on
    /// disk (v3 images), and syncs (even with `cache=unsafe`: the bits order everything else).
    fn update_incompat_bits(&self, set: u64, clear: u64) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        let mut b = [0u8; 8];
        let at = fields::INCOMPATIBLE_FEATURES;
        self.storage
            .read_at(&mut b, at)
            .map_err(Self::io_err("cannot read header", at))?;
        let v = (BigEndian::read_u64(&b) | set) & !clear;
        BigEndian::write_u64(&mut b, v);
        self.storage
            .write_at(&b, at)
            .map_err(Self::io_err("cannot write header", at))?;
        self.storage
            .flush()
            .map_err(Self::io_err("cannot sync header", at))
    }

    /// The guest contents of the cluster starting at guest offset `gc`, zero past the disk end.
    fn cluster_contents(&self, gc: u64) -> Result<Vec<u8>> {
        let cs = self.header.cluster_size();
        let mut buf = vec![0u8; cs as usize];
        let n = cs.min(self.header.size - gc) as usize;
        self.read_inner(&mut buf[..n], gc)?;
        Ok(buf)
    }

    /// Writes `data` at offset `within` of the guest cluster starting at `gc`, or, for the two
    /// cases that [`Self::write_inner`] batches with the clusters next to it, decides where it
    /// goes and returns that without writing (see [`Deferred`]).
    fn write_in_cluster(
        &self,
        st: &mut WriteState,
        gc: u64,
        within: u64,
        data: &[u8],
    ) -> Result<Deferred> {
        let h: &Header = &self.header;
        let cs = h.cluster_size();
        let l1_idx = (gc >> h.l1_shift()) as usize;
        let l2_off = self.writable_l2(st, l1_idx)?;
        let table = self.l2_table(l2_off)?;
        let words = if h.extended_l2() { 2 } else { 1 };
        let idx = ((gc >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize * words;
        let entry = table[idx];
        let bitmap = h.extended_l2().then(|| table[idx + 1]);
        let desc = l2::decode_descriptor(entry, h)?;
        let copied = entry & OFLAG_COPIED != 0;

        if let Some(bitmap) = bitmap.filter(|_| !matches!(desc, Descriptor::Compressed(_))) {
            let at = L2Slot {
                l2_off,
                idx,
                entry,
                bitmap,
                desc,
            };
            self.write_subclusters(st, gc, within, data, &table, at)?;
            return Ok(Deferred::Nothing);
        }

        // A cluster this image owns alone: overwrite in place.
        if let (Descriptor::Normal(host), true) = (desc, copied) {
            self.guard_data_write(st, host + within, data.len() as u64)?;
            return Ok(Deferred::Data {
                host: host + within,
            });
        }

        // Otherwise the whole cluster gets new contents: what the guest sees now (copy-on-write
        // from a shared, compressed, zero or backing cluster), with `data` laid over it.
        let whole = within == 0 && data.len() as u64 == cs;
        let (host, fresh) = match desc {
            _ if self.data_file.is_some() => (gc, false),
            Descriptor::Normal(host) | Descriptor::Zero(Some(host)) if copied => (host, false),
            _ => (self.alloc_cluster(st)? * cs, true),
        };
        if let Err(e) = self.guard_data_write(st, host, cs) {
            if fresh {
                let _ = self.unallocate(st, host / cs);
            }
            return Err(e);
        }
        let mapping = Remap {
            l2_off,
            idx,
            entry: host | OFLAG_COPIED,
            bitmap: (words == 2).then_some(ALL_ALLOCATED),
            release: (!(copied
                && matches!(desc, Descriptor::Normal(x) | Descriptor::Zero(Some(x)) if x == host)))
            .then_some(desc),
            fresh,
        };
        if whole {
            // Written straight from the caller's buffer, with its neighbours.
            return Ok(Deferred::Mapped { host, mapping });
        }
        drop(table);
        let mut content = match self.cluster_contents(gc) {
            Ok(c) => c,
            Err(e) => return self.abandon(st, &mut vec![mapping], e),
        };
        content[within as usize..within as usize + data.len()].copy_from_slice(data);
        self.write_run(st, (&content, None), gc, host, &mut vec![mapping])?;
        Ok(Deferred::Nothing)
    }

    /// [`Self::write_in_cluster`], finishing what it defers at once.
    fn write_in_cluster_now(
        &self,
        st: &mut WriteState,
        gc: u64,
        within: u64,
        data: &[u8],
    ) -> Result<()> {
        // An encrypted image is written in whole sectors: a partial one is completed with
        // what the guest sees around it.
        if let Some((a, buf)) = self.sector_aligned(gc + within, data)? {
            return self.write_in_cluster_now(st, gc, a - gc, &buf);
        }
        let mut remaps = Vec::new();
        let guest = gc + within;
        match self.write_in_cluster(st, gc, within, data)? {
            Deferred::Nothing => Ok(()),
            Deferred::Data { host } => self.write_run(st, (data, None), guest, host, &mut remaps),
            Deferred::Mapped { host, mapping } => {
                remaps.push(mapping);
                self.write_run(st, (data, None), guest, host, &mut remaps)
            }
        }
    }

    /// Points L2 entries at their new clusters (after the data is on its way to them: see the
    /// module documentation) and queues what they pointed at before for release. Consecutive
    /// entries of one table are changed together, in place when no reader holds the table.
    fn apply_remaps(&self, st: &mut WriteState, remaps: &[Remap]) -> Result<()> {
        for group in remaps.chunk_by(|a, b| a.l2_off == b.l2_off) {
            let l2_off = group[0].l2_off;
            self.l2_cache.modify(
                l2_off,
                || self.read_table(l2_off, "L2 table"),
                |t| {
                    for r in group {
                        t[r.idx] = r.entry;
                        if let Some(b) = r.bitmap {
                            t[r.idx + 1] = b;
                        }
                    }
                },
            )?;
            for r in group {
                if let Some(desc) = r.release {
                    self.release(st, desc);
                }
            }
        }
        Ok(())
    }

    /// Extended L2 (qcow2.rst "Extended L2 Entries"): writes `data` at offset `within` of the
    /// guest cluster `gc` touching only the subclusters it covers, as qemu does. The data goes
    /// in place into a host cluster this image owns alone, otherwise into a new host cluster
    /// (into which the subclusters still allocated in the old, shared one are copied). The parts
    /// of partly written subclusters that were not allocated are filled with what the guest saw
    /// there (zeros or the backing file); subclusters the write does not touch keep their state,
    /// so unallocated ones still read from the backing file.
    fn write_subclusters(
        &self,
        st: &mut WriteState,
        gc: u64,
        within: u64,
        data: &[u8],
        table: &[u64],
        at: L2Slot,
    ) -> Result<()> {
        let h: &Header = &self.header;
        let cs = h.cluster_size();
        let sc_bits = h.cluster_bits - 5;
        let sc = 1u64 << sc_bits;
        let end = within + data.len() as u64;
        let (first, last) = (within >> sc_bits, (end - 1) >> sc_bits);
        let touched = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
        let alloc = at.bitmap & ALL_ALLOCATED;
        let copied = at.entry & OFLAG_COPIED != 0;
        let (host, fresh) = match at.desc {
            Descriptor::Normal(x) if copied || self.data_file.is_some() => (x, false),
            _ if self.data_file.is_some() => (gc, false),
            _ => (self.alloc_cluster(st)? * cs, true),
        };
        // The data goes to `host` (and the subclusters kept from the old cluster with it);
        // if that fails, a cluster allocated for it is freed again, as in `write_run`.
        let st_ref: &WriteState = st;
        let written = (|| -> Result<()> {
            // Moving to a new host cluster: keep the subclusters allocated in the old one that this
            // write does not wholly replace.
            if let Some(old) = match at.desc {
                Descriptor::Normal(old) if old != host => Some(old),
                _ => None,
            } {
                let whole = |i: u64| i * sc >= within && (i + 1) * sc <= end;
                let mut i = 0;
                while i < 32 {
                    if alloc & (1 << i) == 0 || whole(i) {
                        i += 1;
                        continue;
                    }
                    let mut j = i + 1;
                    while j < 32 && alloc & (1 << j) != 0 && !whole(j) {
                        j += 1;
                    }
                    let mut buf = vec![0u8; ((j - i) * sc) as usize];
                    self.data_storage()
                        .read_at(&mut buf, old + i * sc)
                        .map_err(Self::io_err("read failed", old + i * sc))?;
                    if let Some(c) = &self.crypt {
                        c.recrypt(gc + i * sc, old + i * sc, host + i * sc, &mut buf)?;
                    }
                    self.guard_data_write(st_ref, host + i * sc, buf.len() as u64)?;
                    self.data_storage()
                        .write_at(&buf, host + i * sc)
                        .map_err(Self::io_err("write failed", host + i * sc))?;
                    i = j;
                }
            }
            // Fill the unwritten parts of partly written subclusters that hold no data yet.
            let disk_end = h.size - gc;
            let head = if alloc & (1 << first) == 0 {
                within - first * sc
            } else {
                0
            };
            let tail = if alloc & (1 << last) == 0 {
                ((last + 1) * sc).min(disk_end).saturating_sub(end)
            } else {
                0
            };
            let start = within - head;
            if head == 0 && tail == 0 {
                self.guard_data_write(st_ref, host + start, data.len() as u64)?;
                let data = self.encrypted(data, gc + start, host + start)?;
                self.data_storage()
                    .debug_event(crate::blkdebug::Event::WriteAio);
                self.data_storage()
                    .write_at(&data, host + start)
                    .map_err(Self::io_err("write failed", host + start))?;
            } else {
                let mut buf = vec![0u8; (head + data.len() as u64 + tail) as usize];
                self.read_inner(&mut buf[..head as usize], gc + start)?;
                buf[head as usize..head as usize + data.len()].copy_from_slice(data);
                self.read_inner(&mut buf[head as usize + data.len()..], gc + end)?;
                self.guard_data_write(st_ref, host + start, buf.len() as u64)?;
                if let Some(c) = &self.crypt {
                    c.encrypt(gc + start, host + start, &mut buf)?;
                }
                self.data_storage()
                    .debug_event(crate::blkdebug::Event::WriteAio);
                self.data_storage()
                    .write_at(&buf, host + start)
                    .map_err(Self::io_err("write failed", host + start))?;
            }
            Ok(())
        })();
        if let Err(e) = written {
            if fresh {
                let _ = self.unallocate(st, host / cs);
            }
            return Err(e);
        }
        let entry = host | OFLAG_COPIED;
        let bitmap = (at.bitmap | touched) & !(touched << 32);
        if entry == at.entry && bitmap == at.bitmap {
            return Ok(());
        }
        if !matches!(at.desc, Descriptor::Normal(x) if x == host) {
            self.release(st, at.desc);
        }
        let mut t = table.to_vec();
        t[at.idx] = entry;
        t[at.idx + 1] = bitmap;
        self.l2_cache.put_dirty(at.l2_off, t.into());
        Ok(())
    }

    /// With a raw external data file (qcow2.rst "data_file_raw"), which must hold the guest
    /// data by itself, makes `[guest, guest + len)` of it read as zeros too (clipped to the disk
    /// size), before the L2 entry says so. Nothing to do otherwise.
    fn zero_raw_data_file(&self, guest: u64, len: u64) -> Result<()> {
        if !self.header.data_file_raw() {
            return Ok(());
        }
        let len = len.min(self.header.size.saturating_sub(guest));
        self.data_storage()
            .zero_range(guest, len)
            .map_err(Self::io_err("cannot zero the raw data file", guest))
    }

    /// Extended L2: makes the subclusters `first..=last` of the guest cluster at `gc` read as
    /// zeros by setting their zero bits (qcow2.rst "Extended L2 Entries"); the host cluster, if
    /// any, stays. Returns `false` for a compressed cluster, whose subclusters cannot be told
    /// apart (the caller writes zeros instead).
    fn zero_subclusters(
        &self,
        st: &mut WriteState,
        gc: u64,
        first: u64,
        last: u64,
    ) -> Result<bool> {
        let h: &Header = &self.header;
        let sc_bits = h.cluster_bits - 5;
        self.zero_raw_data_file(gc + (first << sc_bits), (last + 1 - first) << sc_bits)?;
        // Even where nothing is allocated yet, the zero bits are recorded (allocating the L2
        // table), as qemu records them.
        let l1_idx = (gc >> h.l1_shift()) as usize;
        let l2_off = self.writable_l2(st, l1_idx)?;
        let table = self.l2_table(l2_off)?;
        let idx = ((gc >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize * 2;
        if let Descriptor::Compressed(_) = l2::decode_descriptor(table[idx], h)? {
            return Ok(false);
        }
        let range = ((1u64 << (last + 1)) - 1) & !((1u64 << first) - 1);
        let bitmap = (table[idx + 1] & !range) | (range << 32);
        if bitmap != table[idx + 1] {
            let mut t = table.to_vec();
            t[idx + 1] = bitmap;
            self.l2_cache.put_dirty(l2_off, t.into());
        }
        Ok(true)
    }

    /// Stores `z`, the compressed contents of the whole guest cluster at guest offset `gc`
    /// (see [`crate::qcow2::format::compress::compress_cluster`]), packed right after the
    /// previous compressed cluster (qcow2.rst "Compressed Clusters Descriptor").
    pub fn write_compressed(&self, gc: u64, z: &[u8]) -> Result<()> {
        let h: &Header = &self.header;
        let cs = h.cluster_size();
        if h.has_data_file() {
            return Err(Error::unsupported(
                "compressed clusters cannot be written to an image with an external data file",
            ));
        }
        if self.is_encrypted() {
            return Err(Error::unsupported(crate::qcow2::crypt::NO_COMPRESSION));
        }
        if !gc.is_multiple_of(cs) || gc >= h.size || z.is_empty() || z.len() as u64 >= cs {
            return Err(Error::invalid_input(format!(
                "bad compressed write of {} bytes at {gc:#x}",
                z.len()
            )));
        }
        let mut st = self.write_state()?;
        self.track_write(&mut st, gc, cs.min(h.size - gc))?;
        let len = z.len() as u64;
        // The L2 table first, then the data, as qemu allocates them (the file then ends with
        // the compressed data, not with a table).
        let l1_idx = (gc >> h.l1_shift()) as usize;
        let l2_off = self.writable_l2(&mut st, l1_idx)?;
        // Continue in the partly filled host cluster if the data fits or the clusters after it
        // are free; otherwise start on fresh contiguous clusters.
        let mut start = None;
        if let Some(tail) = st.compressed_tail.filter(|t| t % cs != 0) {
            let (first, last) = (tail / cs, (tail + len - 1) / cs);
            let mut free = true;
            for c in first + 1..=last {
                // A cluster whose refcount block does not exist yet is not used here: creating the
                // block could take that very cluster.
                let idx = (c >> self.refblock_bits()) as usize;
                let has_block = st
                    .reftable
                    .get(idx)
                    .is_some_and(|e| e & REFT_OFFSET_MASK != 0);
                free &= has_block && self.refcount_of(&st, c)? == 0 && !st.metadata.contains(&c);
            }
            // Sharing the cluster takes one more reference than narrow refcounts may hold.
            let r = self.refcount_of(&st, first)?;
            let shared = refcount::increased(first, r, 1, h.refcount_order).ok();
            if let Some(r) = shared.filter(|_| free) {
                self.set_refcount_of(&mut st, first, r)?;
                for c in first + 1..=last {
                    self.set_refcount_of(&mut st, c, 1)?;
                }
                start = Some(tail);
            }
        }
        let start = match start {
            Some(s) => s,
            None => {
                let n = len.div_ceil(cs);
                let first = self.find_free(&mut st, n, true)?;
                for c in first..first + n {
                    self.set_refcount_of(&mut st, c, 1)?;
                }
                first * cs
            }
        };
        let end = start + len;
        self.note_end(end.div_ceil(cs));
        self.storage
            .write_at(z, start)
            .map_err(Self::io_err("write failed", start))?;
        // The decompressed-cluster cache is keyed by host offset, which this may reuse.
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        st.compressed_tail = Some(end);

        let table = self.l2_table(l2_off)?;
        let words = if h.extended_l2() { 2 } else { 1 };
        let idx = ((gc >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize * words;
        let old = l2::decode_descriptor(table[idx], h)?;
        self.release(&mut st, old);
        let x = 62 - (h.cluster_bits - 8);
        let sectors = ((end + 511) >> 9) - (start >> 9);
        let mut t = table.to_vec();
        t[idx] = l2::OFLAG_COMPRESSED | ((sectors - 1) << x) | start;
        if words == 2 {
            t[idx + 1] = 0;
        }
        self.l2_cache.put_dirty(l2_off, t.into());
        self.flush_if_full(&mut st)
    }

    /// Makes the whole guest cluster at `gc` read as zeros, freeing its storage when `unmap`.
    /// Returns `false` if the format cannot express that here (version 2 with a backing file),
    /// in which case the caller writes zeros.
    fn zero_cluster(&self, st: &mut WriteState, gc: u64, unmap: bool) -> Result<bool> {
        let h: &Header = &self.header;
        self.zero_raw_data_file(gc, h.cluster_size())?;
        let l1_idx = (gc >> h.l1_shift()) as usize;
        let l1e = self.l1()[l1_idx];
        let has_backing = self.backing.is_some();
        if h.version < 3 && has_backing {
            return Ok(false);
        }
        if l1e & L1E_OFFSET_MASK == 0 && !has_backing && h.version < 3 {
            // Unallocated without a backing file reads as zeros already. (Version 3 records
            // the zero flag even here, allocating the L2 table, as qemu does.)
            return Ok(true);
        }
        let l2_off = self.writable_l2(st, l1_idx)?;
        let table = self.l2_table(l2_off)?;
        let words = if h.extended_l2() { 2 } else { 1 };
        let idx = ((gc >> h.cluster_bits) & ((1 << h.l2_bits()) - 1)) as usize * words;
        let entry = table[idx];
        let desc = l2::decode_descriptor(entry, h)?;
        let copied = entry & OFLAG_COPIED != 0;
        // Version 2 cannot keep a preallocated zero cluster: it unallocates.
        let keep = match desc {
            Descriptor::Normal(x) | Descriptor::Zero(Some(x))
                if copied && !unmap && self.data_file.is_none() && h.version >= 3 =>
            {
                Some(x)
            }
            _ => None,
        };
        if keep.is_none() {
            self.release(st, desc);
        }
        let mut t = table.to_vec();
        if words == 2 {
            t[idx] = keep.map_or(0, |x| x | OFLAG_COPIED);
            t[idx + 1] = ALL_ZERO;
        } else if h.version >= 3 {
            t[idx] = keep.map_or(OFLAG_ZERO, |x| x | OFLAG_COPIED | OFLAG_ZERO);
        } else {
            // Version 2 without a backing file: an unallocated cluster reads as zeros.
            t[idx] = 0;
        }
        self.l2_cache.put_dirty(l2_off, t.into());
        Ok(true)
    }

    pub(in crate::qcow2) fn write_state(&self) -> Result<std::sync::MutexGuard<'_, WriteState>> {
        match &self.write {
            Some(m) => Ok(m.lock().unwrap_or_else(|e| e.into_inner())),
            None => Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only")),
        }
    }

    /// Writes `buf` at guest offset `guest` (inside the disk, checked by the caller).
    pub(crate) fn write_inner(&self, buf: &[u8], guest: u64) -> Result<()> {
        // Whole sectors whose IVs follow the guest offset (legacy AES) are encrypted before the
        // write lock is taken, by each writing thread in parallel; the lock only places them.
        let stored = match &self.crypt {
            Some(c)
                if c.follows_guest()
                    && guest.is_multiple_of(crate::crypto::SECTOR)
                    && (buf.len() as u64).is_multiple_of(crate::crypto::SECTOR) =>
            {
                let mut e = buf.to_vec();
                c.encrypt(guest, 0, &mut e)?;
                Some(e)
            }
            _ => None,
        };
        let mut st = self.write_state()?;
        self.track_write(&mut st, guest, buf.len() as u64)?;
        // An encrypted image is written in whole sectors: a partial one is completed with
        // what the guest sees around it.
        let aligned = self.sector_aligned(guest, buf)?;
        let (buf, guest) = match &aligned {
            Some((a, b)) => (&b[..], *a),
            None => (buf, guest),
        };
        let stored = stored.as_deref().filter(|_| aligned.is_none());
        match self.write_locked(&mut st, buf, guest, stored) {
            // Out of space (a full block device) while clusters this session released wait
            // for the next flush to be reusable: qemu would have reused them, so flush and try
            // again. The first attempt's new clusters were freed again, and what it mapped is
            // rewritten in place, so the retry writes the same.
            Err(e) if is_out_of_space(&e) && !st.pending_free.is_empty() => {
                self.flush_locked(&mut st)?;
                self.write_locked(&mut st, buf, guest, stored)
            }
            r => r,
        }
    }

    /// [`Self::write_inner`] under the write lock; `stored`, if given, is `buf` as it is to
    /// be stored (encrypted already).
    fn write_locked(
        &self,
        st: &mut WriteState,
        buf: &[u8],
        guest: u64,
        stored: Option<&[u8]>,
    ) -> Result<()> {
        let part = |a: usize, b: usize| stored.map(|s| &s[a..b]);
        let cs = self.header.cluster_size();
        let mut pos = 0usize;
        // Clusters whose data goes to consecutive host offsets are written with one call: the
        // run of `buf` from `run_start`, to host offset `run_host`, and the L2 entries that
        // then point at it.
        let (mut run_start, mut run_host, mut remaps) = (0usize, 0u64, Vec::new());
        while pos < buf.len() {
            let g = guest + pos as u64;
            let within = g & (cs - 1);
            let n = ((cs - within) as usize).min(buf.len() - pos);
            let deferred = match self.write_in_cluster(st, g - within, within, &buf[pos..pos + n]) {
                Ok(d) => d,
                // The clusters allocated for the run so far will not be written now.
                Err(e) => return self.abandon(st, &mut remaps, e),
            };
            let (host, mapping) = match deferred {
                Deferred::Nothing => (None, None),
                Deferred::Data { host } => (Some(host), None),
                Deferred::Mapped { host, mapping } => (Some(host), Some(mapping)),
            };
            let extends = run_start < pos && host == Some(run_host + (pos - run_start) as u64);
            if !extends {
                let g = guest + run_start as u64;
                let data = (&buf[run_start..pos], part(run_start, pos));
                self.write_run(st, data, g, run_host, &mut remaps)?;
                run_start = if host.is_some() { pos } else { pos + n };
                run_host = host.unwrap_or(0);
            }
            remaps.extend(mapping);
            pos += n;
            if self.flush_needed(st) {
                let g = guest + run_start as u64;
                let data = (&buf[run_start..pos], part(run_start, pos));
                self.write_run(st, data, g, run_host, &mut remaps)?;
                run_start = pos;
                self.flush_locked(st)?;
            }
        }
        let g = guest + run_start as u64;
        let data = (&buf[run_start..], part(run_start, buf.len()));
        self.write_run(st, data, g, run_host, &mut remaps)
    }

    /// Writes `data` (a run of [`Self::write_inner`] at guest offset `guest`, maybe empty) at
    /// host offset `host`, encrypted if the image is (`data.1`, when given, is the run as it
    /// is to be stored, encrypted already), then makes the L2 entries in `remaps` point at it.
    fn write_run(
        &self,
        st: &mut WriteState,
        data: (&[u8], Option<&[u8]>),
        guest: u64,
        host: u64,
        remaps: &mut Vec<Remap>,
    ) -> Result<()> {
        if !data.0.is_empty() {
            let event = || {
                self.data_storage()
                    .debug_event(crate::blkdebug::Event::WriteAio)
            };
            let written = match (data.1, &self.crypt) {
                (Some(stored), _) => {
                    event();
                    self.write_data(stored, host)
                }
                (None, Some(c)) => {
                    // Encrypted piece by piece through the reused buffer.
                    let mut buf = std::mem::take(&mut st.crypt_buf);
                    event();
                    let r = self.write_encrypted(c, data.0, guest, host, &mut buf);
                    st.crypt_buf = buf;
                    r
                }
                (None, None) if self.is_encrypted() => {
                    Err(Error::invalid_input(crate::qcow2::crypt::KEY_REQUIRED))
                }
                (None, None) => {
                    event();
                    self.write_data(data.0, host)
                }
            };
            if let Err(e) = written {
                // Out of space (a full block device, a full file system) or an I/O error:
                // the new clusters may hold part of the data, but no table points at them.
                return self.abandon(st, remaps, e);
            }
        }
        let r = self.apply_remaps(st, remaps);
        remaps.clear();
        r
    }

    /// Writes `data`, as it is stored, at host offset `host` of the data file.
    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.data_storage()
            .write_at(data, host)
            .map_err(Self::io_err("write failed", host))
    }

    /// Writes `data`, guest data at guest offset `guest`, encrypted with `c` at host offset
    /// `host`, in pieces of [`CRYPT_PIECE`] bytes, each encrypted into `buf` and written from it.
    fn write_encrypted(
        &self,
        c: &crate::qcow2::crypt::Encryption,
        data: &[u8],
        guest: u64,
        host: u64,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        for (k, piece) in data.chunks(CRYPT_PIECE).enumerate() {
            let at = (k * CRYPT_PIECE) as u64;
            let (g, h) = (guest + at, host + at);
            buf.clear();
            buf.extend_from_slice(piece);
            c.encrypt(g, h, buf).map_err(|e| e.at(h))?;
            self.write_data(buf, h)?;
        }
        Ok(())
    }

    /// `data`, guest data at guest offset `guest` to be written at host offset `host`, as it
    /// is stored: encrypted if the image is (a copy), else as it is.
    fn encrypted<'a>(
        &self,
        data: &'a [u8],
        guest: u64,
        host: u64,
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        match &self.crypt {
            None if self.is_encrypted() => {
                Err(Error::invalid_input(crate::qcow2::crypt::KEY_REQUIRED))
            }
            None => Ok(std::borrow::Cow::Borrowed(data)),
            Some(c) => {
                let mut buf = data.to_vec();
                c.encrypt(guest, host, &mut buf).map_err(|e| e.at(host))?;
                Ok(std::borrow::Cow::Owned(buf))
            }
        }
    }

    /// For an encrypted image, a write of `data` at guest offset `guest` that does not cover
    /// whole 512-byte sectors, widened to whole sectors: the guest offset of the first and the
    /// data, completed with what the guest reads around it (zeros past the end of the disk).
    /// `None` when nothing needs widening.
    fn sector_aligned(&self, guest: u64, data: &[u8]) -> Result<Option<(u64, Vec<u8>)>> {
        let sector = crate::crypto::SECTOR;
        let end = guest + data.len() as u64;
        if !self.is_encrypted()
            || (guest.is_multiple_of(sector) && end.is_multiple_of(sector))
            || data.is_empty()
        {
            return Ok(None);
        }
        let a = guest - guest % sector;
        let b = end.div_ceil(sector) * sector;
        let mut buf = vec![0u8; (b - a) as usize];
        let readable = (b.min(self.header.size) - a) as usize;
        self.read_inner(&mut buf[..readable], a)?;
        buf[(guest - a) as usize..(end - a) as usize].copy_from_slice(data);
        Ok(Some((a, buf)))
    }

    /// Gives up the L2 changes in `remaps` after `err` stopped the write before their data was
    /// written: the clusters allocated for them are freed at once (nothing points at them), as
    /// qemu frees an allocation whose write failed, so that a failed write leaks nothing.
    /// Returns `err`.
    fn abandon<T>(&self, st: &mut WriteState, remaps: &mut Vec<Remap>, err: Error) -> Result<T> {
        for r in remaps.drain(..) {
            if r.fresh {
                // Failing to free it only leaks it; the write's own error is what matters.
                let c = (r.entry & l2::L2E_OFFSET_MASK) >> self.header.cluster_bits;
                let _ = self.unallocate(st, c);
            }
        }
        Err(err)
    }

    /// Frees host cluster `c`, allocated by [`Self::alloc_cluster`] or `alloc_run` for data
    /// or metadata that was never written in full and that nothing points at.
    pub(in crate::qcow2) fn unallocate(&self, st: &mut WriteState, c: u64) -> Result<()> {
        self.set_refcount_of(st, c, 0)?;
        st.metadata.remove(&c);
        st.free_hint = st.free_hint.min(c);
        Ok(())
    }

    /// Makes `[guest, guest + len)` read as zeros.
    pub(crate) fn write_zeroes_inner(&self, guest: u64, len: u64, unmap: bool) -> Result<()> {
        let mut st = self.write_state()?;
        self.track_write(&mut st, guest, len)?;
        self.zeroes_locked(&mut st, guest, len, unmap)
    }

    /// [`Self::write_zeroes_inner`] without marking the range in the persistent bitmaps: the
    /// area a resize adds is not a guest write (qemu does not mark it either).
    pub(in crate::qcow2) fn write_zeroes_untracked(
        &self,
        guest: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        let mut st = self.write_state()?;
        self.zeroes_locked(&mut st, guest, len, unmap)
    }

    fn zeroes_locked(&self, st: &mut WriteState, guest: u64, len: u64, unmap: bool) -> Result<()> {
        let cs = self.header.cluster_size();
        let end = guest + len;
        let mut g = guest;
        while g < end {
            let within = g & (cs - 1);
            let n = (cs - within).min(end - g);
            // A whole cluster, or the tail of the last cluster of the disk.
            let whole = within == 0 && (n == cs || g + n == self.header.size);
            if !(whole && self.zero_cluster(st, g, unmap)?) {
                self.zero_in_cluster(st, g - within, within, n)?;
            }
            g += n;
            self.flush_if_full(st)?;
        }
        Ok(())
    }

    /// Makes `[within, within + n)` of the guest cluster at `gc` read as zeros when it is not a
    /// whole cluster the format can mark zero, as qemu's `qcow2_co_pwrite_zeroes` does, unit by
    /// unit (subclusters with extended L2, else the cluster): a unit wholly covered gets its zero
    /// bit (extended L2); a partly covered unit is marked zero as a whole if it holds no data in
    /// this layer and its uncovered parts already read as zeros (block status, as qemu's
    /// `is_zero`); otherwise zeros are written as data.
    fn zero_in_cluster(&self, st: &mut WriteState, gc: u64, within: u64, n: u64) -> Result<()> {
        let h: &Header = &self.header;
        let ext = h.extended_l2();
        let unit_bits = if ext {
            h.cluster_bits - 5
        } else {
            h.cluster_bits
        };
        let disk_end = h.size - gc;
        let end = within + n;
        let mut u = within >> unit_bits;
        while u << unit_bits < end {
            let (us, ue) = (u << unit_bits, ((u + 1) << unit_bits).min(disk_end));
            let (a, b) = (within.max(us), end.min(ue));
            if ext && a == us && b == ue {
                // A run of whole subclusters: their zero bits in one table update.
                let mut last = u;
                while ((last + 2) << unit_bits).min(disk_end) <= end
                    && (last + 1) << unit_bits < disk_end
                {
                    last += 1;
                }
                if self.zero_subclusters(st, gc, u, last)? {
                    u = last + 1;
                    continue;
                }
            }
            let mut zeroed = false;
            if h.version >= 3 {
                let whole = a == us && b == ue;
                let may_mark = whole && ext
                    || (matches!(
                        self.map_slot(gc + us, 1)?.0,
                        Slot::Unallocated { .. } | Slot::Zero { .. }
                    ) && self.known_zero(gc + us, a - us)?
                        && self.known_zero(gc + b, ue - b)?);
                if may_mark {
                    zeroed = if ext {
                        self.zero_subclusters(st, gc, u, u)?
                    } else {
                        self.zero_cluster(st, gc, false)?
                    };
                }
            }
            if !zeroed {
                let zeros = vec![0u8; (b - a) as usize];
                self.write_in_cluster_now(st, gc, a, &zeros)?;
            }
            u += 1;
        }
        Ok(())
    }

    /// Whether the guest range `[off, off + len)` is known to read as zeros from its block
    /// status (without reading data).
    fn known_zero(&self, off: u64, len: u64) -> Result<bool> {
        let mut pos = off;
        while pos < off + len {
            let st = self.status_inner(pos, off + len - pos)?;
            if !st.zero || st.len == 0 {
                return Ok(false);
            }
            pos += st.len;
        }
        Ok(true)
    }

    pub(in crate::qcow2) fn flush_if_full(&self, st: &mut WriteState) -> Result<()> {
        if self.flush_needed(st) {
            self.flush_locked(st)?;
        }
        Ok(())
    }

    /// Whether so many tables are dirty that they are to be written now.
    fn flush_needed(&self, st: &WriteState) -> bool {
        self.l2_cache.dirty_count() + st.refblocks.dirty_count() > MAX_DIRTY_TABLES
    }

    /// Flushes everything written so far (see the module documentation for the order).
    /// Then the persistent bitmaps that writes changed are stored
    /// ([`crate::qcow2::bitmap::track`]).
    pub(crate) fn flush_inner(&self) -> Result<()> {
        let mut st = self.write_state()?;
        self.flush_locked(&mut st)?;
        self.store_tracked(&mut st)
    }

    pub(in crate::qcow2) fn sync(&self) -> Result<()> {
        if self.unsafe_cache.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.storage
            .flush()
            .map_err(|e| Error::io("sync failed", e))?;
        if let Some((d, _)) = &self.data_file {
            d.flush()
                .map_err(|e| Error::io("sync of the data file failed", e))?;
        }
        Ok(())
    }

    fn write_refblocks(&self, st: &WriteState) -> Result<()> {
        for (off, block) in st.refblocks.dirty() {
            self.storage
                .write_at(&block, off)
                .map_err(Self::io_err("cannot write refcount block", off))?;
            st.refblocks.mark_clean(off, &block);
        }
        Ok(())
    }

    /// Flushes metadata (see the module documentation for the order). With lazy refcounts,
    /// refcount blocks stay in memory unless the refcount structure changed (a new block or a
    /// moved table: written at once, so that a repair after a crash finds every block it needs)
    /// or too many are dirty; the dirty bit is set before the first metadata write.
    pub(in crate::qcow2) fn flush_locked(&self, st: &mut WriteState) -> Result<()> {
        self.flush_with(st, false)
    }

    /// How many dirty refcount blocks lazy refcounts keep in memory at most.
    fn lazy_refblock_limit(&self) -> usize {
        let by_bytes = (LAZY_MAX_DIRTY_REFBLOCK_BYTES >> self.header.cluster_bits).max(4);
        (by_bytes as usize).min(LAZY_MAX_DIRTY_REFBLOCKS)
    }

    /// Whether a flush would write any metadata.
    fn metadata_pending(&self, st: &WriteState) -> bool {
        self.l2_cache.dirty_count() > 0
            || st.l1_dirty
            || st.refblocks.dirty_count() > 0
            || st.reftable_dirty
            || st.old_reftable.is_some()
            || !st.pending_free.is_empty()
    }

    /// [`Self::flush_locked`]; with `all_refcounts`, refcount blocks are written even with lazy
    /// refcounts (as at close).
    fn flush_with(&self, st: &mut WriteState, all_refcounts: bool) -> Result<()> {
        let cs = self.header.cluster_size();
        let write_refcounts = !st.lazy
            || all_refcounts
            || st.reftable_dirty
            || st.old_reftable.is_some()
            || st.refblocks.dirty_count() > self.lazy_refblock_limit();
        if st.lazy && !st.marked_dirty && self.metadata_pending(st) {
            // 0. Lazy refcounts: from now on the refcounts on disk may be stale.
            self.set_incompat_bit(incompat::DIRTY)?;
            st.marked_dirty = true;
        }
        // 1. Refcount increases.
        if write_refcounts {
            self.write_refblocks(st)?;
        }
        if st.reftable_dirty {
            let mut raw = vec![0u8; st.reftable.len() * 8];
            for (i, e) in st.reftable.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            let off = st.reftable_offset;
            self.storage
                .write_at(&raw, off)
                .map_err(Self::io_err("cannot write refcount table", off))?;
            st.reftable_dirty = false;
        }
        if write_refcounts {
            self.sync()?;
        }
        // 2. The header points at a moved refcount table.
        if let Some((old_off, old_bytes)) = st.old_reftable.take() {
            let clusters = (st.reftable.len() as u64 * 8 / cs) as u32;
            let (f, at) = fields::reftable(st.reftable_offset, clusters);
            self.storage
                .write_at(&f, at)
                .map_err(Self::io_err("cannot write header", at))?;
            self.sync()?;
            st.pending_free
                .extend((old_off / cs)..(old_off + old_bytes).div_ceil(cs));
        }
        // 3. L2 tables, then the L1 table.
        for (off, table) in self.l2_cache.dirty() {
            let mut raw = vec![0u8; table.len() * 8];
            for (i, e) in table.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            self.storage
                .write_at(&raw, off)
                .map_err(Self::io_err("cannot write L2 table", off))?;
            self.l2_cache.mark_clean(off, &table);
        }
        if st.l1_dirty {
            let l1 = self.l1().clone();
            let mut raw = vec![0u8; l1.len() * 8];
            for (i, e) in l1.iter().enumerate() {
                BigEndian::write_u64(&mut raw[i * 8..], *e);
            }
            let off = self.header.l1_table_offset;
            self.storage
                .write_at(&raw, off)
                .map_err(Self::io_err("cannot write L1 table", off))?;
            st.l1_dirty = false;
        }
        self.sync()?;
        // 4. Refcount decreases, now that nothing on disk points at the released clusters.
        // With lazy refcounts they stay in memory like the increases.
        if !st.pending_free.is_empty() {
            let mut freed = Vec::new();
            for c in std::mem::take(&mut st.pending_free) {
                let r = self.refcount_of(st, c)?;
                if r == 0 {
                    // The reference just dropped was itself the corruption (a cluster in use
                    // with refcount 0, or outside the file): nothing is left to free. qemu
                    // treats this as a non-fatal corruption too.
                    continue;
                }
                self.set_refcount_of(st, c, r - 1)?;
                if r == 1 {
                    // A freed cluster may be reused for anything: compressed data no longer
                    // continues in it.
                    if st.compressed_tail.is_some_and(|t| t / cs == c) {
                        st.compressed_tail = None;
                    }
                    st.metadata.remove(&c);
                    self.l2_cache.forget(c * cs);
                    st.free_hint = st.free_hint.min(c);
                    if st.punch.remove(&c) {
                        freed.push(c);
                    }
                }
            }
            st.punch.clear();
            // Best effort, as qemu passes a guest's discard on to the host file: one hole per
            // run of adjacent freed clusters, in file order (fewer calls, and the file system
            // splits its extents no more than the final layout needs).
            freed.sort_unstable();
            let mut i = 0;
            while i < freed.len() {
                let mut j = i + 1;
                while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                    j += 1;
                }
                let (off, len) = (freed[i] * cs, (j - i) as u64 * cs);
                self.storage
                    .punch_hole(off, len)
                    .map_err(Self::io_err("cannot discard a freed cluster", off))?;
                i = j;
            }
            if !st.lazy || all_refcounts {
                self.write_refblocks(st)?;
                self.sync()?;
            }
        }
        Ok(())
    }

    /// Writes everything back for a clean close: the persistent bitmaps writes changed, all
    /// metadata including every refcount block, then clears the dirty bit this session set
    /// (qcow2.rst "lazy refcounts"), syncing before and after.
    pub(crate) fn close_inner(&self) -> Result<()> {
        let mut st = self.write_state()?;
        self.store_tracked(&mut st)?;
        self.flush_with(&mut st, true)?;
        if st.marked_dirty {
            self.update_incompat_bits(0, incompat::DIRTY)?;
            st.marked_dirty = false;
        }
        Ok(())
    }
}

/// Whether `e` is the operating system's "No space left on device" (ENOSPC).
fn is_out_of_space(e: &Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
        == Some(libc::ENOSPC)
}
