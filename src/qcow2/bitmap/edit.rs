//! The bitmap operations `qemu-img bitmap` offers, on qcow2 images: [`PersistentBitmaps`] for
//! [`Qcow2Image`]. Each operation first stores what dirty tracking holds
//! ([`super::track`]), then commits a new directory ([`super::write`]); its
//! checks and messages are qemu's (`block-dirty-bitmap-add` and friends).

use super::directory::{
    self as bitmaps, inconsistent, not_found, read_contents, read_directory, read_directory_at,
    Bitmap, FLAG_AUTO, MAX_BITMAPS, MAX_DATA_BYTES, MAX_DIRECTORY_BYTES, MAX_GRANULARITY_BITS,
    MAX_NAME_BYTES, MAX_TABLE_ENTRIES, MIN_GRANULARITY_BITS,
};
use super::tracker::Tracker;
use super::write::{Contents, Planned};
use crate::bitmap::{BitmapDesc, DirtyBitmap, PersistentBitmaps, SparseBits};
use crate::error::{Error, ErrorKind, Result, ResultExt};
use crate::qcow2::Qcow2Image;

/// qemu's smallest and largest default granularity.
const DEFAULT_GRANULARITY_RANGE: (u64, u64) = (4096, 65536);

impl Qcow2Image {
    /// The granularity a bitmap gets when none is asked for: the cluster size, kept within
    /// 4 KiB..64 KiB (qemu's default).
    pub fn default_bitmap_granularity(&self) -> u64 {
        let (lo, hi) = DEFAULT_GRANULARITY_RANGE;
        self.header.cluster_size().clamp(lo, hi)
    }

    /// Runs `f` on the validated directory, with dirty tracking's pending bits stored first,
    /// and commits the plans it returns (`None`: nothing to change); dirty tracking then
    /// follows the new directory.
    fn edit_bitmaps(
        &self,
        f: impl FnOnce(&[Bitmap]) -> Result<Option<Vec<Planned>>>,
    ) -> Result<()> {
        let mut st = self.write_state()?;
        self.store_tracked(&mut st)?;
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        bitmaps::validate(self, &dir)?;
        let Some(plans) = f(&dir)? else {
            return Ok(());
        };
        if dir.is_empty() {
            self.check_room_for_bitmaps_ext()?;
        }
        self.commit_bitmaps(&mut st, &dir, plans)?;
        let dir = read_directory_at(self, self.bitmaps_ext())?;
        st.bitmaps = Tracker::for_directory(&dir);
        Ok(())
    }

    /// Every entry of `dir` kept as it is, except `name`'s, which `change` replaces (or
    /// drops, returning `None`). Errors if `name` is not there; unless `any_state`, also if it
    /// is inconsistent or not understood.
    fn plans_changing(
        dir: &[Bitmap],
        name: &str,
        any_state: bool,
        change: impl FnOnce(&Bitmap) -> Option<Planned>,
    ) -> Result<Vec<Planned>> {
        let b = find(dir, name)?;
        if !any_state {
            usable(b)?;
        }
        let mut change = Some(change);
        let mut out = Vec::with_capacity(dir.len());
        for x in dir {
            if x.raw_name != b.raw_name {
                out.push(Planned::restore(x.clone()));
            } else if let Some(p) = change.take().and_then(|c| c(x)) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// Every entry of `dir` stored anew where qemu would ([`Planned::restore`]), as qemu-img
    /// leaves an image with bitmaps it opened for writing even when nothing changed; `None`
    /// for no bitmaps.
    fn restore_all(dir: &[Bitmap]) -> Option<Vec<Planned>> {
        (!dir.is_empty()).then(|| dir.iter().cloned().map(Planned::restore).collect())
    }

    /// qemu's error for a bitmap that cannot be stored in this image.
    fn not_persistent(&self, name: &str, why: &str) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            format!(
                "Can't make bitmap '{name}' persistent in '{}': {why}",
                self.path.display()
            ),
        )
    }
}

/// The entry named `name`.
fn find<'a>(dir: &'a [Bitmap], name: &str) -> Result<&'a Bitmap> {
    dir.iter()
        .find(|b| b.name == name)
        .ok_or_else(|| not_found(name))
}

/// Fails for a bitmap that may only be removed: inconsistent, or with flags or extra data vimg
/// does not know.
fn usable(b: &Bitmap) -> Result<()> {
    if b.in_use() {
        return Err(inconsistent(&b.name));
    }
    if !b.understood() {
        return Err(Error::unsupported(format!(
            "Bitmap '{}' has flags or extra data vimg does not know and cannot be used",
            b.name
        )));
    }
    Ok(())
}

impl PersistentBitmaps for Qcow2Image {
    fn bitmaps_supported(&self) -> bool {
        self.header.version >= 3
    }

    fn list_bitmaps(&self) -> Result<Vec<BitmapDesc>> {
        let st = self
            .write
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        let dir = read_directory(self).in_file(&self.path)?;
        Ok(dir
            .iter()
            .map(|b| {
                let mut d = b.desc();
                d.in_use &= !st.as_ref().is_some_and(|s| s.bitmaps.owns_in_use_flag(b));
                d
            })
            .collect())
    }

    fn read_bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        let st = self
            .write
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        let tracker = st.as_ref().map(|s| &s.bitmaps);
        let r = (|| {
            let dir = read_directory(self)?;
            bitmaps::validate(self, &dir)?;
            let b = find(&dir, name)?;
            if !tracker.is_some_and(|t| t.owns_in_use_flag(b)) {
                usable(b)?;
            }
            let size = self.header.size;
            let mut c = read_contents(self, b, size)?;
            if let Some(p) = tracker.and_then(|t| t.pending(b)) {
                c.bits.union_with(p);
                c.bits.truncate(size.div_ceil(1 << b.granularity_bits));
            }
            Ok(c)
        })();
        r.map_err(|e: Error| match e.kind() {
            ErrorKind::InvalidInput => e,
            _ => e.with_path(&self.path),
        })
    }

    fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid_input("Bitmap name cannot be empty"));
        }
        let g = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() || g > 1 << MAX_GRANULARITY_BITS => {
                return Err(Error::invalid_input(
                    "Granularity must be power of 2 and at least 512",
                ))
            }
            Some(g) => g,
            None => self.default_bitmap_granularity(),
        };
        if self.header.version < 3 {
            return Err(self.not_persistent(name, "Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        let gbits = g.trailing_zeros() as u8;
        debug_assert!(gbits >= MIN_GRANULARITY_BITS);
        let size = self.header.size;
        let cs = self.header.cluster_size();
        let entries = bitmaps::table_entries_for(size, gbits, cs);
        if size.div_ceil(g).div_ceil(8) > MAX_DATA_BYTES || entries > MAX_TABLE_ENTRIES {
            return Err(self.not_persistent(
                name,
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        if size == 0 {
            return Err(self.not_persistent(name, "the virtual disk is empty"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(self.not_persistent(
                name,
                &format!("Name length exceeds maximum ({MAX_NAME_BYTES} characters)"),
            ));
        }
        let entry = Bitmap::new(name, gbits, if enabled { FLAG_AUTO } else { 0 });
        self.edit_bitmaps(|dir| {
            if dir.len() >= MAX_BITMAPS as usize {
                return Err(self.not_persistent(
                    name,
                    "Maximum number of persistent bitmaps is already reached",
                ));
            }
            let dir_bytes: usize = dir.iter().map(|b| b.entry_len()).sum();
            if (dir_bytes + entry.entry_len()) as u64 > MAX_DIRECTORY_BYTES {
                return Err(self.not_persistent(name, "Not enough space in the bitmap directory"));
            }
            if dir.iter().any(|b| b.name == name) {
                return Err(Error::invalid_input(format!(
                    "Bitmap already exists: {name}"
                )));
            }
            let mut plans: Vec<Planned> = dir.iter().cloned().map(Planned::restore).collect();
            plans.push(Planned {
                entry,
                contents: Contents::Empty,
                clip_tail: false,
            });
            Ok(Some(plans))
        })
    }

    fn remove_bitmap(&self, name: &str) -> Result<()> {
        // As qemu: the directory loses the entry at once, the others unchanged; then every
        // bitmap left is stored anew, as qemu does when it closes the image.
        self.edit_bitmaps(|dir| {
            let b = find(dir, name)?;
            let others = dir.iter().filter(|x| x.raw_name != b.raw_name);
            Ok(Some(others.cloned().map(Planned::keep).collect()))
        })?;
        self.edit_bitmaps(|dir| Ok(Self::restore_all(dir)))
    }

    fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.edit_bitmaps(|dir| {
            Self::plans_changing(dir, name, false, |b| {
                Some(Planned {
                    entry: b.clone(),
                    contents: Contents::Empty,
                    clip_tail: false,
                })
            })
            .map(Some)
        })
    }

    fn enable_bitmap(&self, name: &str, enabled: bool) -> Result<()> {
        self.edit_bitmaps(|dir| {
            if find(dir, name)?.enabled() == enabled {
                usable(find(dir, name)?)?;
                return Ok(Self::restore_all(dir));
            }
            Self::plans_changing(dir, name, false, |b| {
                let mut e = b.clone();
                e.flags ^= FLAG_AUTO;
                Some(Planned::restore(e))
            })
            .map(Some)
        })
    }

    fn merge_into_bitmap(&self, name: &str, src: &DirtyBitmap) -> Result<()> {
        let size = self.header.size;
        self.edit_bitmaps(|dir| {
            let b = find(dir, name)?;
            usable(b)?;
            if src.disk_size != size {
                return Err(Error::invalid_input(format!(
                    "Bitmaps are of different sizes (destination size is {size}, source size is \
                     {}) and can't be merged",
                    src.disk_size
                )));
            }
            let g = u32::from(b.granularity_bits);
            let bits: SparseBits = src.bits.regranulate(src.granularity_bits, g, size);
            if bits.is_empty() {
                return Ok(None);
            }
            Self::plans_changing(dir, name, false, |b| {
                Some(Planned {
                    entry: b.clone(),
                    contents: Contents::Rewrite(bits),
                    clip_tail: false,
                })
            })
            .map(Some)
        })
    }
}
