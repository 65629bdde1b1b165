//! Fleecing: a point-in-time view of a served disk, as qemu's fleecing (a copy-before-write
//! filter over the live disk and a temporary image, exported read-only).
//!
//! [`PointInTimeView::start`] attaches a [`BeforeWrite`](crate::BeforeWrite) hook to a live
//! [`Export`]: from that moment, before a write (zero write, discard) changes a chunk of the
//! disk for the first time, the chunk's old data is read from the live image once and kept
//! aside, in memory up to [`ViewOptions::memory_bound`] bytes and past it in a temporary raw
//! file in [`ViewOptions::temp_dir`] (removed when the view stops). The view reads kept chunks
//! from there and the others from the live image, so it reads the disk as it was at the start
//! whatever is written since (see [`view`] for how a write and a read of the same chunk are
//! ordered). The guest comes first: if the store fails (its disk full), the view *breaks*:
//! writes go on, and reads of the view fail saying why.
//!
//! [`start`] makes a read-only [`Export`] of the view for an NBD server, any client of which
//! (nbdcopy, `qemu-img convert nbd+unix://...`, libvirt's pull mode) copies the disk as it was
//! at the start; given a persistent dirty bitmap of the live image, the export also offers
//! `qemu:dirty-bitmap:NAME`, a copy of the bitmap frozen at the start point, so that a client
//! copies only what changed since the bitmap was last reset.
//!
//! The view stops (its hook detached, its store freed, reads failing) when its
//! [`PointInTimeView`] is dropped or [`PointInTimeView::stop`]ped.

mod image;
pub mod store;
pub mod view;

use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result};
use crate::nbd::server::{Contexts, Export, ExportSettings, HookId};
use image::{FrozenBitmap, ViewImage};
use std::path::PathBuf;
use std::sync::Arc;
pub use view::ViewStats;
use view::{SaveHook, Shared};

/// The default bound of the memory a view keeps old data in (64 MiB).
pub const DEFAULT_MEMORY_BOUND: u64 = 64 << 20;

/// The smallest unit the view keeps (64 KiB, qemu's default cluster), or the live image's
/// cluster size if larger.
pub const MIN_CHUNK: u64 = 64 << 10;

/// How a view keeps old data.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Bytes of old data kept in memory at most; the rest goes to a temporary file.
    pub memory_bound: u64,
    /// The directory of the temporary file (`None`: `$TMPDIR`, else `/tmp`).
    pub temp_dir: Option<PathBuf>,
}

impl Default for ViewOptions {
    fn default() -> Self {
        ViewOptions {
            memory_bound: DEFAULT_MEMORY_BOUND,
            temp_dir: None,
        }
    }
}

/// A running point-in-time view of one live export; dropping it stops the view.
pub struct PointInTimeView {
    shared: Arc<Shared>,
    live: Arc<Export>,
    hook: Option<HookId>,
    frozen: Option<Arc<FrozenBitmap>>,
}

/// One disk of [`PointInTimeView::start_group`]: the live export, the bitmap to freeze (if
/// any), and whether to record the chunks of that bitmap's granularity written after the start
/// ([`PointInTimeView::written_since_start`]).
pub struct ViewRequest<'a> {
    /// The live export.
    pub live: &'a Arc<Export>,
    /// A persistent dirty bitmap of its image to freeze at the start point.
    pub bitmap: Option<&'a str>,
    /// Record the writes since the start, at the bitmap's granularity (needs `bitmap`).
    pub record_writes: bool,
}

impl PointInTimeView {
    /// Starts a view of `live` as it is now; with `bitmap`, freezes a copy of that persistent
    /// dirty bitmap at the same point (an error, and no view, if the image has no such usable
    /// bitmap).
    pub fn start(live: &Arc<Export>, opts: &ViewOptions, bitmap: Option<&str>) -> Result<Self> {
        let req = ViewRequest {
            live,
            bitmap,
            record_writes: false,
        };
        Ok(Self::start_group(&[req], opts)?.remove(0))
    }

    /// Starts views of several live exports at one point in time (a consistent backup of
    /// several disks). Writes to these exports that begin while the bitmaps are being read
    /// wait until they are read, so each frozen bitmap is exactly the bitmap at the start
    /// point.
    pub fn start_group(disks: &[ViewRequest<'_>], opts: &ViewOptions) -> Result<Vec<Self>> {
        let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let mut prepared = Vec::with_capacity(disks.len());
        for d in disks {
            let image = d.live.image();
            let chunk = image.cluster_size().unwrap_or(0).max(MIN_CHUNK);
            if !chunk.is_power_of_two() {
                return Err(Error::unsupported(format!(
                    "a point-in-time view needs a power-of-two cluster size, not {chunk}"
                ))
                .with_path(image.filename()));
            }
            let granularity = match (d.bitmap, d.record_writes) {
                (Some(name), true) => Some(bitmap_desc(d.live, name)?.granularity.trailing_zeros()),
                (None, true) => {
                    return Err(Error::invalid_input(
                        "recording writes for a new bitmap generation needs a bitmap",
                    ))
                }
                _ => None,
            };
            let shared = Arc::new(Shared::new(
                chunk,
                image.virtual_size(),
                image.filename().to_path_buf(),
                opts.memory_bound,
                dir.clone(),
                granularity,
            ));
            prepared.push(shared);
        }
        let hooks: Vec<(Arc<Export>, Arc<dyn crate::BeforeWrite>)> = disks
            .iter()
            .zip(&prepared)
            .map(|(d, shared)| {
                let hook = SaveHook {
                    shared: shared.clone(),
                    live: Arc::downgrade(d.live),
                };
                (
                    d.live.clone(),
                    Arc::new(hook) as Arc<dyn crate::BeforeWrite>,
                )
            })
            .collect();
        let refs: Vec<(&Export, Arc<dyn crate::BeforeWrite>)> =
            hooks.iter().map(|(e, h)| (e.as_ref(), h.clone())).collect();
        // The start point: writes begun before it have reached the images; later ones wait in
        // the hooks until the views are ready.
        let ids = Export::attach_hooks(&refs);
        let mut views: Vec<PointInTimeView> = disks
            .iter()
            .zip(prepared)
            .zip(ids)
            .map(|((d, shared), id)| PointInTimeView {
                shared,
                live: d.live.clone(),
                hook: Some(id),
                frozen: None,
            })
            .collect();
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_millis(
            tests::FREEZE_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut failure = None;
        for (v, d) in views.iter_mut().zip(disks) {
            if let Some(name) = d.bitmap {
                match freeze(d.live, name) {
                    Ok(f) => v.frozen = Some(Arc::new(f)),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        for v in &views {
            v.shared.set_ready();
        }
        match failure {
            Some(e) => Err(e), // dropping the views detaches their hooks
            None => Ok(views),
        }
    }

    /// The view as a read-only image (reads fail once the view is stopped or broken). It
    /// offers the frozen bitmap, if any, through [`crate::BlockImage::as_bitmaps`].
    pub fn image(&self) -> Box<dyn crate::BlockImage> {
        Box::new(ViewImage {
            shared: self.shared.clone(),
            live: self.live.clone(),
            frozen: self.frozen.clone(),
        })
    }

    /// The frozen copy of the bitmap, if one was asked for.
    pub fn frozen_bitmap(&self) -> Option<&DirtyBitmap> {
        self.frozen.as_ref().map(|f| &f.bitmap)
    }

    /// The size of the unit the view keeps (a power of two).
    pub fn chunk_size(&self) -> u64 {
        self.shared.chunk
    }

    /// What the view has done so far.
    pub fn stats(&self) -> ViewStats {
        self.shared.stats()
    }

    /// The chunks written since the start at the frozen bitmap's granularity, if the view
    /// was asked to record them ([`ViewRequest::record_writes`]): the bits a new generation
    /// of the bitmap must hold.
    pub fn written_since_start(&self) -> Option<DirtyBitmap> {
        let st = self.shared.lock();
        st.written.as_ref().map(|(g, bits)| DirtyBitmap {
            granularity_bits: *g,
            disk_size: self.shared.size,
            bits: bits.clone(),
        })
    }

    /// The live export the view is of.
    pub fn live(&self) -> &Arc<Export> {
        &self.live
    }

    /// Stops the view: the hook is detached (writes in flight finish first), the kept data
    /// freed and the temporary file removed; reads of the view fail from now on.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(id) = self.hook.take() {
            self.live.detach_hook(id);
        }
        self.shared.stop();
    }
}

impl Drop for PointInTimeView {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Starts a point-in-time view of `live` ([`PointInTimeView::start`]) and makes a read-only
/// export of it named `name`, offering `qemu:dirty-bitmap:BITMAP` (frozen at the start) when
/// `bitmap` is given: what a control socket's `fleece-start` serves. The export reads the view
/// until the returned [`PointInTimeView`] is dropped (`fleece-stop`), then fails its reads.
pub fn start(
    live: &Arc<Export>,
    name: &str,
    opts: &ViewOptions,
    bitmap: Option<&str>,
) -> Result<(Export, PointInTimeView)> {
    let view = PointInTimeView::start(live, opts, bitmap)?;
    let export = view.export(name)?;
    Ok((export, view))
}

impl PointInTimeView {
    /// A read-only export of the view named `name`, with the frozen bitmap as a context.
    pub fn export(&self, name: &str) -> Result<Export> {
        let image = self.image();
        let bitmaps: Vec<String> = self.frozen.iter().map(|f| f.desc.name.clone()).collect();
        let contexts = Contexts::new(image.as_ref(), false, &bitmaps)?;
        let settings = ExportSettings {
            name: name.to_string(),
            description: Some(format!(
                "point-in-time view of {}",
                self.live.image().filename().display()
            )),
            readonly: true,
            multi_conn: true,
            ..Default::default()
        };
        Ok(Export::new(image, settings, contexts, None))
    }
}

pub(in crate::live) fn bitmap_desc(live: &Export, name: &str) -> Result<crate::bitmap::BitmapDesc> {
    let image = live.image();
    let bitmaps = image.as_bitmaps().ok_or_else(|| {
        Error::unsupported(format!(
            "the {} format has no persistent dirty bitmaps",
            image.format()
        ))
        .with_path(image.filename())
    })?;
    bitmaps
        .list_bitmaps()?
        .into_iter()
        .find(|b| b.name == name)
        .ok_or_else(|| crate::bitmap::not_found(name).with_path(image.filename()))
}

fn freeze(live: &Export, name: &str) -> Result<FrozenBitmap> {
    let desc = bitmap_desc(live, name)?;
    let image = live.image();
    let bitmap = image
        .as_bitmaps()
        .expect("checked by bitmap_desc")
        .read_bitmap(name)
        .map_err(|e| e.with_path(image.filename()))?;
    Ok(FrozenBitmap {
        desc: crate::bitmap::BitmapDesc {
            enabled: false,
            in_use: false,
            ..desc
        },
        bitmap,
    })
}

#[cfg(test)]
mod tests;
