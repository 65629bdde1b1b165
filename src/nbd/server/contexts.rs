//! The metadata contexts an export offers (proto.md "Metadata querying"): `base:allocation`,
//! qemu's `qemu:allocation-depth` (`-A`) and `qemu:dirty-bitmap:NAME` (`-B NAME`, from the
//! image's persistent bitmaps), their ids, the answers to LIST/SET_META_CONTEXT queries, and
//! their extents.

use super::export::{CmdResult, CommandError};
use crate::bitmap::DirtyBitmap;
use crate::nbd::wire::*;
use crate::{BlockImage, Error, GuestOffset, Result};
use std::sync::Mutex;

/// The id of `base:allocation`.
pub const ID_BASE_ALLOCATION: u32 = 1;
/// The id of `qemu:allocation-depth`.
pub const ID_ALLOCATION_DEPTH: u32 = 2;
/// The id of the first dirty bitmap; the others follow.
pub const ID_FIRST_BITMAP: u32 = 3;

/// A dirty bitmap served as a context, re-read after writes.
struct Served {
    name: String,
    /// The bitmap's dirty ranges and the write generation they were read at.
    cache: Mutex<(u64, Vec<(u64, u64)>)>,
}

/// The contexts of one export.
#[derive(Default)]
pub struct Contexts {
    allocation_depth: bool,
    bitmaps: Vec<Served>,
}

impl Contexts {
    /// The contexts of `image`: `base:allocation` always, allocation depth if asked, and
    /// each bitmap of `bitmaps` (read now: an error if the image has no such bitmap or it is
    /// inconsistent, in qemu's words).
    pub fn new(image: &dyn BlockImage, allocation_depth: bool, bitmaps: &[String]) -> Result<Self> {
        let mut served = Vec::new();
        for name in bitmaps {
            let b = read_bitmap(image, name)?;
            served.push(Served {
                name: name.clone(),
                cache: Mutex::new((0, b.dirty_ranges())),
            });
        }
        Ok(Contexts {
            allocation_depth,
            bitmaps: served,
        })
    }

    /// Every context offered, as (id, name).
    pub fn all(&self) -> Vec<(u32, String)> {
        let mut v = vec![(ID_BASE_ALLOCATION, CONTEXT_BASE_ALLOCATION.to_string())];
        if self.allocation_depth {
            v.push((ID_ALLOCATION_DEPTH, CONTEXT_ALLOCATION_DEPTH.to_string()));
        }
        for (i, b) in self.bitmaps.iter().enumerate() {
            v.push((
                ID_FIRST_BITMAP + i as u32,
                format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{}", b.name),
            ));
        }
        v
    }

    /// The contexts one query names: an exact name; with `list`, also a namespace (`base:`,
    /// `qemu:`, `qemu:dirty-bitmap:`) or the empty query list meaning all.
    pub fn matching(&self, query: &str, list: bool) -> Vec<(u32, String)> {
        self.all()
            .into_iter()
            .filter(|(_, name)| {
                name == query
                    || (list
                        && (query == "base:" && name.starts_with("base:")
                            || query == "qemu:" && name.starts_with("qemu:")
                            || query == CONTEXT_DIRTY_BITMAP_PREFIX
                                && name.starts_with(CONTEXT_DIRTY_BITMAP_PREFIX)))
            })
            .collect()
    }

    /// The extents of context `id` over `[offset, offset + len)` (inside the image), at most
    /// `max`; `generation` counts the writes so far (bitmaps are re-read when it moved).
    pub fn extents(
        &self,
        image: &dyn BlockImage,
        id: u32,
        offset: u64,
        len: u64,
        max: usize,
        generation: u64,
    ) -> CmdResult<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let push = |out: &mut Vec<Extent>, n: u64, flags: u64| -> bool {
            match out.last_mut() {
                Some(last) if last.flags == flags => last.length += n,
                _ => {
                    if out.len() == max {
                        return false;
                    }
                    out.push(Extent { length: n, flags })
                }
            }
            true
        };
        if id == ID_BASE_ALLOCATION || (id == ID_ALLOCATION_DEPTH && self.allocation_depth) {
            let mut pos = offset;
            while pos < end {
                let st = image
                    .block_status(GuestOffset(pos), end - pos)
                    .map_err(|e| CommandError::new(errno_from_error(&e), e.to_string()))?;
                let n = st.len.clamp(1, end - pos);
                let flags = if id == ID_BASE_ALLOCATION {
                    (if st.data { 0 } else { STATE_HOLE }) | (if st.zero { STATE_ZERO } else { 0 })
                } else if st.present {
                    st.depth + 1
                } else {
                    0
                };
                if !push(&mut out, n, flags as u64) {
                    break;
                }
                pos += n;
            }
            return Ok(out);
        }
        let Some(b) = id
            .checked_sub(ID_FIRST_BITMAP)
            .and_then(|i| self.bitmaps.get(i as usize))
        else {
            return Err(CommandError::new(
                NBD_EINVAL,
                format!("no meta context with id {id}"),
            ));
        };
        let mut cache = b.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != generation {
            let fresh = read_bitmap(image, &b.name)
                .map_err(|e| CommandError::new(errno_from_error(&e), e.to_string()))?;
            *cache = (generation, fresh.dirty_ranges());
        }
        let ranges = &cache.1;
        // The first dirty range that ends after `offset`.
        let mut i = ranges.partition_point(|&(_, e)| e <= offset);
        let mut pos = offset;
        while pos < end {
            let (flags, next) = match ranges.get(i) {
                Some(&(s, e)) if s <= pos => {
                    i += 1;
                    (STATE_DIRTY, e.min(end))
                }
                Some(&(s, _)) => (0, s.min(end)),
                None => (0, end),
            };
            if !push(&mut out, next - pos, flags as u64) {
                break;
            }
            pos = next;
        }
        Ok(out)
    }
}

fn read_bitmap(image: &dyn BlockImage, name: &str) -> Result<DirtyBitmap> {
    let bitmaps = image.as_bitmaps().ok_or_else(|| {
        Error::unsupported(format!("Bitmap '{name}' is not found"))
            .bare()
            .with_path(image.filename())
    })?;
    bitmaps.read_bitmap(name)
}
