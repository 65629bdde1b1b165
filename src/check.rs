//! The consistency-check capability (`vimg check`), with qemu-img's report fields and exit
//! codes. Formats that can check themselves implement [`Check`]; qcow2's lives in
//! `qcow2::check::consistency`.

use crate::error::Result;
use serde::Serialize;

/// What a check found, in qemu-img's terms (`qemu-img check --output json` keys).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// Errors that kept the check from completing (I/O errors, unreadable tables).
    pub check_errors: u64,
    /// Inconsistencies that may lose data (refcount too low, bad offsets, ...).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references (wasted space only).
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last cluster in use in the image file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one on the host.
    pub fragmented_clusters: u64,
    /// Allocated guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// One line per problem found, in qemu-img's wording where it has one.
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img's exit code for this result: 0 clean, 2 corruptions, 3 leaks only, 1 if the
    /// check could not complete. After a repair, `corruptions` and `leaks` count what is still
    /// wrong, so the code says whether the repaired image is clean.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// A format that can check its own consistency.
pub trait Check {
    /// Checks the image without changing it.
    fn check(&self) -> Result<CheckReport>;
}
