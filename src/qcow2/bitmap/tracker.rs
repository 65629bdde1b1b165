//! The state of dirty tracking ([`super::track`]): which persistent bitmaps an image
//! open for writing keeps up to date, and the bits set in each since it was last stored. Part
//! of the write state; the tracking itself (arming, marking, storing) is in [`super::track`].

use super::directory::Bitmap;
use crate::bitmap::SparseBits;

/// One bitmap vimg keeps up to date.
#[derive(Debug)]
pub(crate) struct Tracked {
    /// The bitmap's name, as stored.
    pub(crate) raw_name: Vec<u8>,
    /// log2 of the bytes one bit covers.
    pub(crate) granularity_bits: u32,
    /// Bits set since the bitmap was last stored.
    pub(crate) bits: SparseBits,
}

/// The dirty tracking state of an image open for writing (part of its write state).
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(crate) tracked: Vec<Tracked>,
    /// Names of enabled bitmaps vimg cannot keep up to date: flagged in use at the first write.
    pub(crate) kept_in_use: Vec<Vec<u8>>,
    /// The tracked and kept bitmaps are flagged in use on disk.
    pub(crate) armed: bool,
    /// A store failed: nothing is cleared any more, the bitmaps stay flagged in use.
    pub(crate) failed: bool,
}

impl Tracker {
    /// The tracker for a directory (validated: tables cover the disk): see the module
    /// documentation.
    pub(crate) fn for_directory(dir: &[Bitmap]) -> Tracker {
        let mut t = Tracker::default();
        for b in dir.iter().filter(|b| b.enabled() && !b.in_use()) {
            if b.understood() {
                t.tracked.push(Tracked {
                    raw_name: b.raw_name.clone(),
                    granularity_bits: u32::from(b.granularity_bits),
                    bits: SparseBits::new(),
                });
            } else {
                t.kept_in_use.push(b.raw_name.clone());
            }
        }
        t
    }

    pub(crate) fn idle(&self) -> bool {
        self.tracked.is_empty() && self.kept_in_use.is_empty()
    }

    pub(crate) fn tracked(&self, raw_name: &[u8]) -> Option<&Tracked> {
        self.tracked.iter().find(|t| t.raw_name == raw_name)
    }

    /// Whether bitmap `b`'s in-use flag on disk is this tracker's own (set for tracking), not
    /// a sign of inconsistency.
    pub(crate) fn owns_in_use_flag(&self, b: &Bitmap) -> bool {
        self.armed && !self.failed && self.tracked(&b.raw_name).is_some()
    }

    /// The bits of bitmap `b` set since its last store, if it is tracked.
    pub(crate) fn pending(&self, b: &Bitmap) -> Option<&SparseBits> {
        self.tracked(&b.raw_name).map(|t| &t.bits)
    }
}
