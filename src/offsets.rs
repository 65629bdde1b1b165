//! Newtypes for the two offset spaces of an image.
//!
//! A *guest* offset is a position in the virtual disk the guest sees; a *host* offset is a
//! position in a file on the host (the image file itself, or an external data file). Mixing the
//! two is the classic qcow2 bug, so they are distinct types that only convert explicitly.

use std::fmt;

/// A byte position in the virtual disk, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte position in a host file (an image file or an external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

macro_rules! offset_impl {
    ($t:ident) => {
        impl $t {
            /// The offset as a plain byte count.
            pub fn get(self) -> u64 {
                self.0
            }
            /// This offset moved forward by `n` bytes; `None` on overflow.
            pub fn checked_add(self, n: u64) -> Option<$t> {
                self.0.checked_add(n).map($t)
            }
            /// The offset within a cluster of `cluster_bits` bits.
            pub fn in_cluster(self, cluster_bits: u32) -> u64 {
                self.0 & ((1u64 << cluster_bits) - 1)
            }
            /// The index of the cluster (of `cluster_bits` bits) holding this offset.
            pub fn cluster_index(self, cluster_bits: u32) -> u64 {
                self.0 >> cluster_bits
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
offset_impl!(GuestOffset);
offset_impl!(HostOffset);
