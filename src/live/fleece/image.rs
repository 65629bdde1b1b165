//! The view as a read-only [`BlockImage`], and its frozen bitmap as the image's only
//! persistent bitmap (what the export's `qemu:dirty-bitmap:NAME` context reads).

use super::view::Shared;
use crate::bitmap::{not_found, BitmapDesc, DirtyBitmap, PersistentBitmaps};
use crate::block::{BlockImage, BlockStatus, ImageFormat};
use crate::error::{Error, ErrorKind, Result};
use crate::info::LayerInfo;
use crate::nbd::server::Export;
use crate::offsets::GuestOffset;
use std::path::Path;
use std::sync::Arc;

/// A dirty bitmap as it was at a view's start.
pub(super) struct FrozenBitmap {
    pub desc: BitmapDesc,
    pub bitmap: DirtyBitmap,
}

/// A handle on a view, read as an image.
pub(super) struct ViewImage {
    pub shared: Arc<Shared>,
    pub live: Arc<Export>,
    pub frozen: Option<Arc<FrozenBitmap>>,
}

fn read_only(name: &Path) -> Error {
    Error::new(ErrorKind::ReadOnly, "a point-in-time view is read-only").with_path(name)
}

impl BlockImage for ViewImage {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn filename(&self) -> &Path {
        &self.shared.name
    }

    fn virtual_size(&self) -> u64 {
        self.shared.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        self.shared.read(self.live.image(), buf, offset.0)
    }

    fn write_at(&self, _buf: &[u8], _offset: GuestOffset) -> Result<()> {
        Err(read_only(&self.shared.name))
    }

    fn write_zeroes(&self, _offset: GuestOffset, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only(&self.shared.name))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        self.shared
            .block_status(self.live.image(), offset.0, max_len)
    }

    fn is_writable(&self) -> bool {
        false
    }

    fn actual_size(&self) -> Option<u64> {
        None
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.shared.chunk)
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.shared.name.display().to_string(),
            format: ImageFormat::Raw.as_str(),
            virtual_size: self.shared.size,
            actual_size: None,
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            backing_format_probed: false,
            snapshots: Vec::new(),
            dirty_flag: false,
            format_specific: None,
        })
    }

    fn as_bitmaps(&self) -> Option<&dyn PersistentBitmaps> {
        self.frozen.as_deref().map(|f| f as &dyn PersistentBitmaps)
    }
}

fn frozen_error(name: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!("bitmap '{name}' of a point-in-time view is a frozen copy and cannot be changed"),
    )
}

impl PersistentBitmaps for FrozenBitmap {
    fn bitmaps_supported(&self) -> bool {
        true
    }

    fn list_bitmaps(&self) -> Result<Vec<BitmapDesc>> {
        Ok(vec![self.desc.clone()])
    }

    fn read_bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        match name == self.desc.name {
            true => Ok(self.bitmap.clone()),
            false => Err(not_found(name)),
        }
    }

    fn add_bitmap(&self, name: &str, _granularity: Option<u64>, _enabled: bool) -> Result<()> {
        Err(frozen_error(name))
    }

    fn remove_bitmap(&self, name: &str) -> Result<()> {
        Err(frozen_error(name))
    }

    fn clear_bitmap(&self, name: &str) -> Result<()> {
        Err(frozen_error(name))
    }

    fn enable_bitmap(&self, name: &str, _enabled: bool) -> Result<()> {
        Err(frozen_error(name))
    }

    fn merge_into_bitmap(&self, name: &str, _src: &DirtyBitmap) -> Result<()> {
        Err(frozen_error(name))
    }
}
