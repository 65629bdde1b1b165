//! Dirty tracking: while a qcow2 image is open for writing, every guest write, zero write,
//! discard and compressed write marks the chunks it touches in each enabled persistent bitmap
//! (qcow2.rst "Dirty tracking bitmaps"), as qemu does.
//!
//! - When the image is opened read-write, the enabled bitmaps that are not in use become *tracked*:
//!   an empty [`SparseBits`] each, holding the bits set since their last store (the stored contents
//!   are not read). Enabled bitmaps vimg cannot keep (unknown flags, or extra data not marked
//!   compatible) are *kept in use*. A damaged directory (a table outside the file or too small for
//!   the disk, duplicate names) makes the read-write open fail, as in qemu. Bitmaps already in use
//!   (left inconsistent by whoever had them open) and disabled bitmaps are not touched.
//! - Before the first write after the open or after a store, the tracked and kept bitmaps are
//!   flagged in use in the directory on disk, synced (`Qcow2Image::set_in_use_in_place`):
//!   from then on a crash leaves them flagged, never a clean bitmap missing the write.
//! - Each write then only sets bits in memory: one per granularity chunk it touches.
//! - [`BlockImage::flush`](crate::BlockImage::flush) and closing the image store the tracked
//!   bitmaps (stored contents with the new bits added) and clear their in-use flag, through a
//!   crash-safe directory commit ([`super::write`]). Bitmaps kept in use stay flagged.
//!   If a store fails, the tracker gives up: the bitmaps stay flagged in use on disk.

use super::directory::{self as bitmaps, read_directory_at, FLAG_IN_USE};
use super::tracker::Tracker;
use super::write::{Contents, Planned};
use crate::bitmap::SparseBits;
use crate::error::{Error, Result};
use crate::qcow2::write::path::WriteState;
use crate::qcow2::Qcow2Image;

impl Qcow2Image {
    /// Builds the tracker of an image just opened read-write (see the module documentation).
    /// Fails if the bitmap directory is damaged.
    pub(in crate::qcow2) fn start_tracking(&self, st: &mut WriteState) -> Result<()> {
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        bitmaps::validate(self, &dir)?;
        st.bitmaps = Tracker::for_directory(&dir);
        Ok(())
    }

    /// Marks guest bytes `[guest, guest + len)` dirty in every tracked bitmap, flagging the
    /// bitmaps in use on disk first if this is the first write since they were stored.
    pub(in crate::qcow2) fn track_write(
        &self,
        st: &mut WriteState,
        guest: u64,
        len: u64,
    ) -> Result<()> {
        let t = &mut st.bitmaps;
        if len == 0 || t.idle() {
            return Ok(());
        }
        if !t.armed {
            let names: Vec<Vec<u8>> = t
                .tracked
                .iter()
                .map(|x| x.raw_name.clone())
                .chain(t.kept_in_use.iter().cloned())
                .collect();
            self.set_in_use_in_place(&|b| names.contains(&b.raw_name))?;
            st.bitmaps.armed = true;
        }
        let end = guest + len;
        for t in &mut st.bitmaps.tracked {
            let g = t.granularity_bits;
            t.bits.set_range(guest >> g, (end - 1) / (1u64 << g) + 1);
        }
        Ok(())
    }

    /// Stores the tracked bitmaps that writes changed since their last store, clearing their
    /// in-use flags (nothing to do if nothing was written).
    pub(in crate::qcow2) fn store_tracked(&self, st: &mut WriteState) -> Result<()> {
        if !st.bitmaps.armed || st.bitmaps.failed {
            return Ok(());
        }
        let r = self.store_tracked_inner(st);
        match r {
            Ok(()) => st.bitmaps.armed = false,
            Err(_) => st.bitmaps.failed = true,
        }
        r
    }

    fn store_tracked_inner(&self, st: &mut WriteState) -> Result<()> {
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        let mut plans = Vec::with_capacity(dir.len());
        for b in &dir {
            let mut entry = b.clone();
            let tracked = st
                .bitmaps
                .tracked
                .iter_mut()
                .find(|t| t.raw_name == b.raw_name);
            plans.push(match tracked {
                Some(t) if t.bits.is_empty() => {
                    entry.flags &= !FLAG_IN_USE;
                    Planned::keep(entry)
                }
                Some(t) => {
                    entry.flags &= !FLAG_IN_USE;
                    Planned {
                        entry,
                        contents: Contents::Or(std::mem::take(&mut t.bits)),
                        clip_tail: false,
                    }
                }
                None => Planned::keep(entry),
            });
        }
        self.commit_bitmaps(st, &dir, plans)
    }

    /// Readies the bitmaps for a change of the disk size, as qemu allows it: refuses (changing
    /// nothing) if a bitmap is inconsistent or not understood, or the new size is 0; otherwise
    /// stores what is pending and flags every bitmap in use until
    /// [`Qcow2Image::finish_bitmaps_resize`] stores them at the new size. Returns whether the
    /// image has bitmaps.
    pub(in crate::qcow2) fn begin_bitmaps_resize(&self, new_size: u64) -> Result<bool> {
        if self.bitmaps_ext().is_none() {
            return Ok(false);
        }
        let mut st = self.write_state()?;
        self.store_tracked(&mut st)?;
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        bitmaps::validate(self, &dir)?;
        if let Some(b) = dir.iter().find(|b| b.in_use()) {
            return Err(bitmaps::inconsistent(&b.name));
        }
        if let Some(b) = dir.iter().find(|b| !b.understood()) {
            return Err(Error::unsupported(format!(
                "cannot resize: bitmap '{}' has flags or extra data vimg does not know",
                b.name
            )));
        }
        if new_size == 0 {
            return Err(Error::unsupported(
                "cannot resize an image with persistent dirty bitmaps to 0 bytes",
            ));
        }
        self.set_in_use_in_place(&|_| true)?;
        Ok(!dir.is_empty())
    }

    /// Stores every bitmap at the new disk size (grown: the new area clear; shrunk: the bits
    /// past the end dropped), clearing the in-use flags [`Qcow2Image::begin_bitmaps_resize`]
    /// set.
    pub(in crate::qcow2) fn finish_bitmaps_resize(&self) -> Result<()> {
        let mut st = self.write_state()?;
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        let plans = dir
            .iter()
            .map(|b| {
                let mut entry = b.clone();
                entry.flags &= !FLAG_IN_USE;
                Planned {
                    entry,
                    contents: Contents::Or(SparseBits::new()),
                    clip_tail: true,
                }
            })
            .collect();
        self.commit_bitmaps(&mut st, &dir, plans)?;
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        st.bitmaps = Tracker::for_directory(&dir);
        Ok(())
    }
}
