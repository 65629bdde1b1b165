//! Changing what an image records about its backing file (qcow2.rst "Header" bytes 8-19 and
//! the "Backing file format name" extension), as `qemu-img rebase` does at its end.

use crate::error::{Error, Result, ResultExt};
use crate::qcow2::format::header::MAX_BACKING_NAME;
use crate::qcow2::Qcow2Image;

impl Qcow2Image {
    /// Records `file` (as given: relative names are relative to this image) with `format` as
    /// the backing file, or removes both with `None`. The backing format extension appears or
    /// disappears with them. The header is rewritten in one write of cluster 0 after all
    /// pending metadata is on disk (see [`Qcow2Image::rewrite_header`]); the backing layer
    /// opened with the image is not replaced (reopen the image to read through the new one).
    pub fn set_backing_file(&mut self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        if let Some(f) = file {
            if f.is_empty() {
                return Err(Error::invalid_input("the backing file name is empty"))
                    .in_file(&self.path);
            }
            if f.len() > MAX_BACKING_NAME as usize {
                return Err(Error::invalid_input(format!(
                    "the backing file name is {} bytes long, more than qemu's limit of \
                     {MAX_BACKING_NAME}",
                    f.len()
                )))
                .in_file(&self.path);
            }
        }
        let mut h = self.header.clone();
        h.backing_file = file.map(str::to_string);
        h.backing_format = file.and(format).map(str::to_string);
        self.rewrite_header(h)
    }
}
