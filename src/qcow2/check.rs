//! The qcow2 consistency check (`vimg check`).

use super::Qcow2Image;
use crate::check::{Check, CheckReport};
use crate::error::{Error, Result};

impl Check for Qcow2Image {
    fn check(&self) -> Result<CheckReport> {
        Err(Error::unsupported("qcow2 check is being written"))
    }
}
