//! `check` on a vmdk disk, as qemu's `vmdk_co_check`: every grain the tables map must start
//! inside its extent file. qemu stops at the first grain that does not (or whose table cannot
//! be read), prints which sector it is, and fails the check with "Invalid argument"; a clean
//! disk reports nothing else (no cluster counts, no leaks).

use super::{ExtentKind, VmdkImage};
use crate::check::{Check, CheckReport};
use crate::error::{Error, Result};

impl Check for VmdkImage {
    fn check(&self) -> Result<CheckReport> {
        let bad = |line: String| {
            Err(
                Error::corrupt(format!("Check failed: Invalid argument ({line})"))
                    .with_path(&self.path),
            )
        };
        for e in &self.extents {
            let flen = match e.storage.len() {
                Ok(l) => l,
                Err(_) => {
                    return bad(format!(
                        "ERROR: could not get extent file length for sector {}",
                        e.start / 512
                    ))
                }
            };
            match &e.kind {
                ExtentKind::Flat(start) => {
                    if *start >= flen {
                        return bad(format!(
                            "ERROR: cluster offset for sector {} points after EOF",
                            e.start / 512
                        ));
                    }
                }
                ExtentKind::Sparse(s) => {
                    let entries = match s.entries(e.storage.as_ref()) {
                        Ok(v) => v,
                        Err(_) => {
                            return bad(format!(
                                "ERROR: could not get cluster_offset for sector {}",
                                e.start / 512
                            ))
                        }
                    };
                    for (grain, gte) in entries {
                        let zeroed = s.zero_grain && gte == super::header::GTE_ZEROED;
                        if gte != 0 && !zeroed && gte as u64 * 512 >= flen {
                            return bad(format!(
                                "ERROR: cluster offset for sector {} points after EOF",
                                (e.start + grain * s.grain) / 512
                            ));
                        }
                    }
                }
                ExtentKind::Delta(_) => {}
            }
        }
        Ok(CheckReport::default())
    }
}
