//! Guest discard requests on qcow2 images, as qemu handles a guest's discard (its
//! `qcow2_co_pdiscard`, without `discard-no-unref`): only whole clusters are discarded, each
//! L2 entry (qcow2.rst "Cluster mapping") is rewritten so that the cluster reads as zeros where
//! the format can say so, and the host cluster loses this reference.
//!
//! - The request is cut at cluster boundaries; partial clusters at either end are left alone,
//!   except the last cluster of a disk whose size is not a multiple of the cluster size, which
//!   counts as whole when the request reaches the end of the disk.
//! - Version 2 images with a backing file are not changed at all: version 2 has no zero flag,
//!   and unallocating would expose the backing file.
//! - A cluster that is allocated (data, compressed, or a preallocated zero cluster), or any
//!   cluster of an image with a backing file, becomes a zero cluster: the zero flag with no
//!   host offset (version 3), all subclusters zero with no host offset (extended L2), or
//!   unallocated (version 2, which then reads as zeros as there is no backing file).
//!   Unallocated clusters without a backing file already read as zeros and stay as they are.
//! - The host cluster's refcount drops at the next flush, after the L2 table no longer
//!   pointing at it is on disk (the write path's deferred release), so clusters shared with
//!   snapshots just lose one reference. One that becomes free is handed back to the host file
//!   system (a hole is punched, where the file system can). In an external data file the
//!   cluster's range is punched at once.
//! - As in qemu, the L2 table covering each discarded range is made the active L1's own
//!   (allocated if missing, copied if shared with a snapshot) even where no entry changes.
//!
//! The image's backing file counts as present when the header names one, even if this open
//! did not attach it: unallocating a version 2 cluster must never expose a backing file.

use super::path::{WriteState, ALL_ZERO};
use crate::error::{Error, Result};
use crate::qcow2::format::l2::{self, Descriptor, OFLAG_ZERO};
use crate::qcow2::Qcow2Image;

/// The guest clusters `[first, end)` a discard of `[guest, guest + len)` on a disk of `size`
/// bytes affects, if any.
pub(crate) fn discard_clusters(
    guest: u64,
    len: u64,
    size: u64,
    cluster_bits: u32,
) -> Option<(u64, u64)> {
    let cs = 1u64 << cluster_bits;
    let first = guest.div_ceil(cs);
    let end_byte = guest.checked_add(len)?;
    let end = if end_byte == size {
        end_byte.div_ceil(cs)
    } else {
        end_byte / cs
    };
    (first < end).then_some((first, end))
}

impl Qcow2Image {
    /// Discards `[guest, guest + len)` (inside the disk, checked by the caller).
    pub(crate) fn discard_inner(&self, guest: u64, len: u64) -> Result<()> {
        let mut st = self.write_state()?;
        self.track_write(&mut st, guest, len)?;
        let h = &self.header;
        let has_backing = h.backing_file.is_some();
        if h.version < 3 && has_backing {
            return Ok(());
        }
        let Some((first, end)) = discard_clusters(guest, len, h.size, h.cluster_bits) else {
            return Ok(());
        };
        let per_table = 1u64 << h.l2_bits();
        let mut c = first;
        while c < end {
            let table_end = ((c / per_table + 1) * per_table).min(end);
            self.discard_in_table(&mut st, c, table_end, has_backing)?;
            self.flush_if_full(&mut st)?;
            c = table_end;
        }
        Ok(())
    }

    /// Discards guest clusters `[first, end)`, all covered by one L2 table.
    fn discard_in_table(
        &self,
        st: &mut WriteState,
        first: u64,
        end: u64,
        has_backing: bool,
    ) -> Result<()> {
        let h = &self.header;
        let l2_bits = h.l2_bits();
        let l2_off = self.writable_l2(st, (first >> l2_bits) as usize)?;
        let mut t = self.l2_table(l2_off)?.to_vec();
        let words = if h.extended_l2() { 2 } else { 1 };
        let (new_entry, new_bitmap) = if words == 2 {
            (0, ALL_ZERO)
        } else if h.version >= 3 {
            (OFLAG_ZERO, 0)
        } else {
            (0, 0)
        };
        let mut changed = false;
        for c in first..end {
            let idx = (c & ((1 << l2_bits) - 1)) as usize * words;
            let entry = t[idx];
            let bitmap = if words == 2 { t[idx + 1] } else { 0 };
            let desc =
                l2::decode_descriptor(entry, h).map_err(|e| e.at(l2_off + idx as u64 * 8))?;
            let allocated = matches!(
                desc,
                Descriptor::Normal(_) | Descriptor::Compressed(_) | Descriptor::Zero(Some(_))
            );
            if !(has_backing || allocated) || (entry == new_entry && bitmap == new_bitmap) {
                continue;
            }
            t[idx] = new_entry;
            if words == 2 {
                t[idx + 1] = new_bitmap;
            }
            changed = true;
            self.release_discarded(st, desc)?;
        }
        if changed {
            self.l2_cache.put_dirty(l2_off, t.into());
        }
        Ok(())
    }

    /// Drops this image's reference to the host storage `desc` names: refcounted clusters are
    /// released at the next flush (and punched once free); a data file range is punched now.
    pub(in crate::qcow2) fn release_discarded(
        &self,
        st: &mut WriteState,
        desc: Descriptor,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let bits = self.header.cluster_bits;
        match desc {
            Descriptor::Normal(x) | Descriptor::Zero(Some(x)) => {
                if self.data_file.is_some() {
                    self.data_storage()
                        .punch_hole(x, cs)
                        .map_err(|e| Error::io("cannot discard in the data file", e).at(x))?;
                } else {
                    st.punch.insert(x >> bits);
                }
            }
            Descriptor::Compressed(d) => {
                let (a, b) = d.host_clusters(bits);
                st.punch.extend(a..=b);
            }
            _ => {}
        }
        self.release(st, desc);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::discard_clusters;

    #[test]
    fn only_whole_clusters_and_the_partial_last_one_are_discarded() {
        let b = 16; // 64 KiB clusters
        let cs = 1u64 << b;
        let size = 10 * cs;
        assert_eq!(discard_clusters(0, cs, size, b), Some((0, 1)));
        assert_eq!(discard_clusters(1, cs, size, b), None);
        assert_eq!(discard_clusters(512, 3 * cs, size, b), Some((1, 3)));
        assert_eq!(discard_clusters(0, cs - 512, size, b), None);
        assert_eq!(discard_clusters(0, size, size, b), Some((0, 10)));
        // A disk ending inside its last cluster.
        let size = 10 * cs + 4096;
        assert_eq!(discard_clusters(10 * cs, 4096, size, b), Some((10, 11)));
        assert_eq!(
            discard_clusters(9 * cs + 1, cs + 4095, size, b),
            Some((10, 11))
        );
        assert_eq!(discard_clusters(10 * cs + 512, 3584, size, b), None);
        assert_eq!(discard_clusters(10 * cs, 4095, size, b), None);
    }
}
