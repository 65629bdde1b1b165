//! VMware's VMDK images (`-f vmdk`, qemu's `block/vmdk.c`).
//!
//! A VMDK disk is a text descriptor listing extents, each covering a run of the guest disk:
//! hosted sparse extents (`KDMV`: a grain directory, grain tables and grains, plainly stored or,
//! stream-optimized, deflated behind grain markers; [`sparse`]), flat extents (a run of a
//! plain file), and the ESXi snapshot deltas (vmfsSparse `COWD`, seSparse), which are opened
//! through `open_delta_extent` ([`cowd`], [`sesparse`]). A monolithic sparse or stream-optimized disk is one file:
//! its header in the first sector, the descriptor embedded at sector 1; the other subformats
//! keep the descriptor in a text file naming extent files beside it.
//!
//! Sources: VMware's "Virtual Disk Format 5.0" technote, libyal's libvmdk notes, and qemu's
//! `block/vmdk.c` for what qemu accepts and refuses, in its words. What qemu does, vimg does:
//! only read-write extent lines of the types qemu opens count (others are skipped, as qemu
//! skips them); a sparse extent's size is its header's capacity; the CIDs and the parent are
//! found in the first 10 KiB of the descriptor; a parent (`parentFileNameHint`) is the backing
//! image, read where this disk has no grain, as long as its CID is the `parentCID` recorded
//! here; the first write of a session gives the disk a new random CID.
//!
//! Names of extent files are resolved against the descriptor's folder, as qemu does (absolute
//! names are taken as they are); names of other kinds (`json:`, URLs) are refused.

mod check;
pub mod cowd;
pub mod create;
pub mod descriptor;
pub mod header;
pub mod mapping;
pub mod sesparse;
pub mod sparse;

use crate::block::{check_request, BlockImage, BlockStatus, FormatDriver, ImageFormat, ProbeInput};
use crate::chain::ChainGuard;
use crate::error::{Error, Result, ResultExt};
use crate::info::{FormatSpecific, LayerInfo, VmdkExtentInfo, VmdkInfo};
use crate::offsets::{GuestOffset, HostOffset};
use crate::storage::Storage;
use descriptor::{c_str, DESC_SIZE, MAX_DESC_LEN};
use mapping::{ExtentMapping, Mapped, Mapping};
use sparse::{Opened, SparseExtent};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The vmdk format's driver.
pub struct VmdkDriver;

/// This format's handle.
const VMDK: ImageFormat = ImageFormat::of(&VmdkDriver);

/// The `create type`s qemu opens from a descriptor file.
const DESCRIPTOR_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

impl FormatDriver for VmdkDriver {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    /// qemu's `vmdk_probe`: certain for `KDMV` or `COWD` at 0, or a text descriptor.
    fn probe(&self, input: &ProbeInput<'_>) -> u32 {
        // qemu looks at the bytes the file has: fewer than 4 are nothing.
        if input.len >= 4 && crate::probe::is_vmdk(input.head) {
            100
        } else {
            0
        }
    }

    fn open(
        &self,
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Box<dyn BlockImage>> {
        Ok(Box::new(VmdkImage::open(
            path, writable, no_backing, guard,
        )?))
    }

    fn create_option_help(&self) -> &'static [crate::option_desc::OptDesc] {
        create::CREATE_OPTIONS
    }

    fn prepare_create(
        &self,
        command: &crate::creation::CreateCommand<'_>,
    ) -> Result<Box<dyn crate::creation::FormatCreation>> {
        create::prepare(command)
    }

    fn check_target_options(&self, options: &[String]) -> Result<()> {
        create::VmdkOptions::parse(options)?.check().map(|_| ())
    }

    fn target_takes_options(&self) -> bool {
        true
    }

    /// Never: a descriptor names the disk's files, its own included (a monolithic disk's
    /// embedded descriptor names the disk file), so a new disk is made under its final name.
    fn target_is_one_file(&self, _options: &[String]) -> bool {
        false
    }

    fn target_compresses(&self, options: &[String]) -> bool {
        create::VmdkOptions::parse(options)
            .ok()
            .and_then(|o| o.subformat())
            == Some(create::Subformat::StreamOptimized)
    }

    fn supports_backing_file(&self) -> bool {
        true
    }

    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn writes_in_order(&self) -> bool {
        true
    }

    fn create_target(
        &self,
        path: &Path,
        size: u64,
        options: &[String],
        backing: (Option<String>, Option<String>),
        no_backing: bool,
        opener: &crate::opener::Opener,
    ) -> Result<Box<dyn BlockImage>> {
        create::create_target(path, size, options, backing, no_backing, opener)
    }
}

/// How an extent stores its bytes.
enum ExtentKind {
    /// A run of a plain file, from this byte offset.
    Flat(u64),
    /// A hosted sparse extent.
    Sparse(Box<SparseExtent>),
    /// An ESXi delta extent (vmfsSparse, seSparse), read-only.
    Delta(Box<dyn ExtentMapping>),
}

/// One extent of the disk.
struct Extent {
    storage: Arc<dyn Storage>,
    /// The extent file (for messages).
    path: PathBuf,
    /// The file's name as qemu names it in `info`.
    name: String,
    /// The extent line's type (empty when the image file is the extent).
    kind_name: String,
    /// Where the extent starts in the guest disk, and its length, in bytes.
    start: u64,
    len: u64,
    /// The extent lives in a file of its own (not the descriptor's).
    own_file: bool,
    kind: ExtentKind,
}

impl Extent {
    fn map(&self, off: u64, max_len: u64) -> Result<Mapped> {
        let max_len = max_len.min(self.len - off);
        match &self.kind {
            ExtentKind::Flat(start) => Ok(Mapped {
                len: max_len,
                mapping: Mapping::Data(HostOffset(start + off)),
            }),
            ExtentKind::Sparse(s) => s.map(self.storage.as_ref(), off, max_len),
            ExtentKind::Delta(d) => d.map(self.storage.as_ref(), off, max_len),
        }
        .in_file(&self.path)
    }

    fn grain(&self) -> Option<u64> {
        match &self.kind {
            ExtentKind::Flat(_) => None,
            ExtentKind::Sparse(s) => Some(s.grain),
            ExtentKind::Delta(d) => Some(d.grain_size()),
        }
    }

    fn compressed(&self) -> bool {
        matches!(&self.kind, ExtentKind::Sparse(s) if s.compressed)
    }
}

/// An open VMDK disk.
pub struct VmdkImage {
    path: PathBuf,
    writable: bool,
    extents: Vec<Extent>,
    size: u64,
    /// The descriptor's own file, when it is not the first extent's.
    desc_file: Option<Arc<dyn Storage>>,
    /// Where the descriptor starts in its file (the 10 KiB qemu reads for CIDs and writes).
    desc_offset: u64,
    create_type: String,
    cid: AtomicU32,
    parent_cid: u32,
    parent_hint: Option<String>,
    backing_path: Option<PathBuf>,
    backing: Option<Box<dyn BlockImage>>,
    /// The backing image is a vmdk whose CID is our `parentCID` (qemu reads nothing from a
    /// parent otherwise).
    parent_valid: bool,
    /// Held for every write; says whether this session has given the disk a new CID.
    writing: Mutex<bool>,
    unsafe_cache: AtomicBool,
}

fn opening(path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e: Error| e.while_opening().with_path(path)
}

fn read_some(storage: &dyn Storage, at: u64, max: usize) -> std::io::Result<Vec<u8>> {
    let len = storage.len()?;
    let n = (len.saturating_sub(at)).min(max as u64) as usize;
    let mut buf = vec![0u8; n];
    storage.read_at(&mut buf, at)?;
    Ok(buf)
}

/// Opens the ESXi delta extent (`VMFSSPARSE` with the `COWD` magic: [`cowd`]; `SESPARSE`:
/// [`sesparse`]) of type `kind` at `path`, whose bytes `storage` holds. Both are read-only in
/// vimg: a writable open is refused (in qemu's words for seSparse, which qemu cannot write
/// either; qemu writes vmfsSparse extents, vimg does not).
fn open_delta_extent(
    kind: &str,
    storage: &Arc<dyn Storage>,
    path: &Path,
    writable: bool,
) -> Result<Box<dyn ExtentMapping>> {
    let sesparse = kind == "SESPARSE";
    if writable {
        return Err(Error::new(
            crate::error::ErrorKind::ReadOnly,
            match sesparse {
                true => "No write support for seSparse images available".to_string(),
                false => "vmfsSparse (COWD) extents are read-only in vimg".to_string(),
            },
        )
        .with_path(path));
    }
    Ok(match sesparse {
        true => Box::new(sesparse::SeSparseExtent::open(storage.clone(), path)?),
        false => Box::new(cowd::CowdExtent::open(storage.clone(), path)?),
    })
}

/// A delta extent reads its tables through the storage it was opened with: the same file
/// as the one `map` is given.
impl ExtentMapping for cowd::CowdExtent {
    fn map(&self, _: &dyn Storage, off: u64, max_len: u64) -> Result<Mapped> {
        cowd::CowdExtent::map(self, off, max_len)
    }
    fn grain_size(&self) -> u64 {
        cowd::CowdExtent::grain_size(self)
    }
    fn capacity(&self) -> u64 {
        self.size()
    }
}

/// As for [`cowd::CowdExtent`].
impl ExtentMapping for sesparse::SeSparseExtent {
    fn map(&self, _: &dyn Storage, off: u64, max_len: u64) -> Result<Mapped> {
        sesparse::SeSparseExtent::map(self, off, max_len)
    }
    fn grain_size(&self) -> u64 {
        sesparse::GRAIN_SECTORS * 512
    }
    fn capacity(&self) -> u64 {
        self.size()
    }
}

impl VmdkImage {
    /// Opens the disk at `path`: its descriptor, every extent, and unless `no_backing` its
    /// parent.
    pub fn open(
        path: &Path,
        writable: bool,
        no_backing: bool,
        guard: &mut ChainGuard,
    ) -> Result<Self> {
        let fail = opening(path);
        let storage: Arc<dyn Storage> = VMDK.open_layer_file(path, writable, guard)?.into();
        let len = storage
            .len()
            .map_err(|e| fail(Error::io("Could not access file", e)))?;
        if len < 4 {
            return Err(fail(Error::corrupt("File is too small, not a valid image")));
        }
        let mut magic = [0u8; 4];
        storage
            .read_at(&mut magic, 0)
            .map_err(|e| fail(Error::io("Could not read from file", e)))?;
        let mut img = VmdkImage {
            path: path.to_path_buf(),
            writable,
            extents: Vec::new(),
            size: 0,
            desc_file: None,
            desc_offset: 0,
            create_type: String::new(),
            cid: AtomicU32::new(0),
            parent_cid: 0,
            parent_hint: None,
            backing_path: None,
            backing: None,
            parent_valid: false,
            writing: Mutex::new(false),
            unsafe_cache: AtomicBool::new(false),
        };
        if &magic == header::MAGIC {
            match SparseExtent::open(storage.as_ref(), writable).map_err(&fail)? {
                Opened::Extent(e) => {
                    img.create_type = match e.compressed {
                        true => "streamOptimized",
                        false => "monolithicSparse",
                    }
                    .into();
                    img.size = e.capacity();
                    img.extents.push(Extent {
                        storage,
                        path: path.to_path_buf(),
                        name: path.display().to_string(),
                        kind_name: String::new(),
                        start: 0,
                        len: e.capacity(),
                        own_file: false,
                        kind: ExtentKind::Sparse(e),
                    });
                }
                Opened::Descriptor(at) => {
                    let text = read_some(storage.as_ref(), at, MAX_DESC_LEN)
                        .map_err(|e| fail(Error::io("Could not read from file", e)))?;
                    img.open_descriptor(c_str(&text), guard).map_err(&fail)?;
                    img.desc_file = Some(storage);
                }
            }
            img.desc_offset = 0x200;
        } else if &magic == header::COWD_MAGIC {
            // A vmfsSparse extent opened on its own (qemu's vmdk_open_vmfs_sparse).
            let d = open_delta_extent("VMFSSPARSE", &storage, path, writable).map_err(&fail)?;
            img.create_type = "vmfsSparse".into();
            img.size = d.capacity();
            img.extents.push(Extent {
                storage,
                path: path.to_path_buf(),
                name: path.display().to_string(),
                kind_name: String::new(),
                start: 0,
                len: d.capacity(),
                own_file: false,
                kind: ExtentKind::Delta(d),
            });
        } else {
            let text = read_some(storage.as_ref(), 0, MAX_DESC_LEN)
                .map_err(|e| fail(Error::io("Could not read from file", e)))?;
            img.open_descriptor(c_str(&text), guard).map_err(&fail)?;
            img.desc_file = Some(storage);
        }
        let desc = img.read_desc().map_err(&fail)?;
        let text = c_str(&desc[..DESC_SIZE - 1]);
        img.parent_hint = descriptor::parent_hint(text).map_err(&fail)?;
        let cid = descriptor::cid(text, false).ok_or_else(|| {
            fail(Error::corrupt(
                "Invalid argument: the descriptor has no valid CID",
            ))
        })?;
        img.cid = AtomicU32::new(cid);
        img.parent_cid = descriptor::cid(text, true).ok_or_else(|| {
            fail(Error::corrupt(
                "Invalid argument: the descriptor has no valid parentCID",
            ))
        })?;
        if let Some(name) = img.parent_hint.clone() {
            let bpath = guard.opener().resolve(path, &name)?;
            img.backing_path = Some(bpath.clone());
            if !no_backing {
                let b = crate::open::open_layer(&bpath, Some(VMDK), false, false, guard)?;
                img.parent_valid = match b.layer_info()?.format_specific {
                    Some(FormatSpecific::Vmdk(i)) => i.cid == img.parent_cid,
                    _ => false,
                };
                img.backing = Some(b);
            }
        }
        Ok(img)
    }

    /// Opens the extents a descriptor file lists (qemu's `vmdk_open_desc_file`).
    fn open_descriptor(&mut self, text: &[u8], guard: &mut ChainGuard) -> Result<()> {
        let ct = descriptor::quoted_value(text, "createType", 128)
            .ok_or_else(|| Error::corrupt("invalid VMDK image descriptor"))?;
        if !DESCRIPTOR_TYPES.contains(&ct.as_str()) {
            return Err(Error::unsupported(format!("Unsupported image type '{ct}'")));
        }
        self.create_type = ct;
        let dir = {
            let s = self.path.display().to_string();
            match s.rfind('/') {
                Some(i) => s[..=i].to_string(),
                None => String::new(),
            }
        };
        for line in descriptor::extent_lines(text)? {
            let f = &line.file;
            if f.starts_with("json:") || f.contains("://") {
                return Err(Error::unsupported(format!(
                    "extent file name '{f}' is not a file name"
                )));
            }
            let name = if f.starts_with('/') {
                f.clone()
            } else {
                format!("{dir}{f}")
            };
            let epath = PathBuf::from(&name);
            let locks = VMDK
                .locks(guard.sharing(), self.writable, guard.depth() == 1)
                .map_err(|e| e.with_path(&epath))?;
            let storage: Arc<dyn Storage> = guard
                .opener()
                .open(&epath, self.writable, locks)
                .map_err(|e| Error::io(format!("Could not open '{name}'"), e))?
                .into();
            let (len, kind) = match line.kind.as_str() {
                "FLAT" | "VMFS" => {
                    let start = line.flat_offset.checked_mul(512).ok_or_else(|| {
                        Error::corrupt(format!("flat extent offset too large in '{name}'"))
                    })?;
                    (line.sectors.saturating_mul(512), ExtentKind::Flat(start))
                }
                "SESPARSE" => {
                    let d = open_delta_extent("SESPARSE", &storage, &epath, self.writable)?;
                    (d.capacity(), ExtentKind::Delta(d))
                }
                _ => {
                    let flen = storage
                        .len()
                        .map_err(|e| Error::io("Could not access file", e).with_path(&epath))?;
                    if flen < 4 {
                        return Err(Error::corrupt("File is too small, not a valid image")
                            .with_path(&epath));
                    }
                    let mut m = [0u8; 4];
                    storage
                        .read_at(&mut m, 0)
                        .map_err(|e| Error::io("Could not read from file", e).with_path(&epath))?;
                    if &m == header::COWD_MAGIC {
                        let d = open_delta_extent(&line.kind, &storage, &epath, self.writable)?;
                        (d.capacity(), ExtentKind::Delta(d))
                    } else if &m == header::MAGIC {
                        match SparseExtent::open(storage.as_ref(), self.writable).in_file(&epath)? {
                            Opened::Extent(e) => (e.capacity(), ExtentKind::Sparse(e)),
                            Opened::Descriptor(_) => return Err(Error::unsupported(
                                "a sparse extent holding a descriptor of its own is not supported",
                            )
                            .with_path(&epath)),
                        }
                    } else {
                        return Err(Error::corrupt("Image not in VMDK format").with_path(&epath));
                    }
                }
            };
            let end = self
                .size
                .checked_add(len)
                .filter(|&e| e <= i64::MAX as u64)
                .ok_or_else(|| Error::corrupt("the extents add up to more than 8 EiB"))?;
            self.extents.push(Extent {
                storage,
                path: epath,
                name,
                kind_name: line.kind.clone(),
                start: self.size,
                len,
                own_file: true,
                kind,
            });
            self.size = end;
        }
        Ok(())
    }

    /// The file holding the descriptor.
    fn desc_storage(&self) -> Option<&dyn Storage> {
        match &self.desc_file {
            Some(s) => Some(s.as_ref()),
            None => self.extents.first().map(|e| e.storage.as_ref()),
        }
    }

    /// The 10 KiB of descriptor qemu reads for its keys (zeros past the end of the file).
    fn read_desc(&self) -> Result<Vec<u8>> {
        let st = self
            .desc_storage()
            .ok_or_else(|| Error::corrupt("no descriptor"))?;
        let mut d = read_some(st, self.desc_offset, DESC_SIZE)
            .map_err(|e| Error::io("Could not read from file", e))?;
        d.resize(DESC_SIZE, 0);
        Ok(d)
    }

    /// Gives the disk a new random CID (qemu's `vmdk_write_cid`, on a session's first write).
    fn write_new_cid(&self) -> Result<()> {
        let mut r = [0u8; 4];
        if getrandom::fill(&mut r).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
                .unwrap_or(0x5eed);
            r = t.to_le_bytes();
        }
        let cid = u32::from_le_bytes(r);
        let desc = self.read_desc().in_file(&self.path)?;
        let Some(new) = descriptor::with_cid(&desc, cid) else {
            return Err(
                Error::corrupt("Invalid argument: the descriptor has no parentCID")
                    .with_path(&self.path),
            );
        };
        let st = self
            .desc_storage()
            .ok_or_else(|| Error::corrupt("no descriptor"))?;
        // The text padded with zeros to whole sectors (a descriptor file grows to 512 bytes,
        // as under qemu).
        let len = (c_str(&new).len() as u64).div_ceil(512) * 512;
        let unsafe_cache = self.unsafe_cache.load(Ordering::Relaxed);
        st.write_at(&new[..len as usize], self.desc_offset)
            .and_then(|_| if unsafe_cache { Ok(()) } else { st.flush() })
            .map_err(|e| {
                Error::io("write failed", e)
                    .at(self.desc_offset)
                    .with_path(&self.path)
            })?;
        self.cid.store(cid, Ordering::Relaxed);
        Ok(())
    }

    /// The extent holding guest offset `pos`, with its index.
    fn extent_at(&self, pos: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        self.extents.get(i).ok_or_else(|| {
            Error::corrupt(format!("no extent holds guest offset {pos}")).with_path(&self.path)
        })
    }

    fn refuse_invalid_parent(&self) -> Result<()> {
        if self.parent_valid {
            return Ok(());
        }
        Err(Error::corrupt(
            "Invalid argument: the parent's CID is not the parentCID this disk records",
        )
        .with_path(&self.path))
    }

    /// Reads the backing image's bytes at `pos` into `buf` (zeros past its end).
    fn read_backing(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        self.refuse_invalid_parent()?;
        let bsize = b.virtual_size();
        let n = (bsize.saturating_sub(pos)).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], GuestOffset(pos))?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Reads this layer's own bytes at `offset`, from the parent where `backing` says so and
    /// this disk has no grain (as zeros otherwise).
    fn read_layer(&self, buf: &mut [u8], offset: u64, backing: bool) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = self.extent_at(pos)?;
            let off = pos - ext.start;
            let m = ext.map(off, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + m.len as usize];
            match m.mapping {
                Mapping::Unallocated if backing => self.read_backing(chunk, pos)?,
                Mapping::Unallocated | Mapping::Zero => chunk.fill(0),
                Mapping::Data(h) => read_plain(ext, chunk, h.0)?,
                Mapping::Compressed(h) => match &ext.kind {
                    ExtentKind::Sparse(s) => s
                        .read_compressed(ext.storage.as_ref(), h.0, off % s.grain, chunk)
                        .in_file(&ext.path)?,
                    _ => {
                        return Err(Error::unsupported("compressed data in this extent kind")
                            .with_path(&ext.path))
                    }
                },
            }
            done += m.len as usize;
        }
        Ok(())
    }

    /// Writes `data` (zeros when `None`) at guest offset `offset`, `len` bytes.
    fn write_range(&self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("the image is opened read-only").with_path(&self.path));
        }
        check_request(self.size, GuestOffset(offset), len).in_file(&self.path)?;
        let mut cid_updated = lock(&self.writing);
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let ext = self.extent_at(pos)?;
            let off = pos - ext.start;
            let left = (len - done).min(ext.len - off);
            // qemu's blkdebug counts the guest writes that reach the file.
            ext.storage
                .debug_event(crate::storage::DebugEvent::WriteAio);
            let n = match &ext.kind {
                ExtentKind::Flat(start) => {
                    let at = start + off;
                    let res = match data {
                        Some(d) => ext
                            .storage
                            .write_at(&d[done as usize..(done + left) as usize], at),
                        // qemu's vmdk writes zeros into a flat extent as data.
                        None => sparse::write_zeros(ext.storage.as_ref(), at, left),
                    };
                    res.map_err(|e| Error::io("write failed", e).at(at).with_path(&ext.path))?;
                    left
                }
                ExtentKind::Sparse(s) => {
                    let n = left.min(s.grain - off % s.grain);
                    let chunk = data.map(|d| &d[done as usize..(done + n) as usize]);
                    let fill = |buf: &mut [u8], grain_off: u64, zeroed: bool| -> Result<()> {
                        if zeroed || self.backing.is_none() {
                            buf.fill(0);
                            Ok(())
                        } else {
                            self.read_backing(buf, ext.start + grain_off)
                        }
                    };
                    s.write(ext.storage.as_ref(), off, chunk, n, &fill)
                        .in_file(&ext.path)?;
                    n
                }
                ExtentKind::Delta(_) => {
                    return Err(Error::unsupported(format!(
                        "writing to {} extents is not supported",
                        ext.kind_name
                    ))
                    .with_path(&ext.path))
                }
            };
            done += n;
            if !*cid_updated {
                self.write_new_cid()?;
                *cid_updated = true;
            }
        }
        Ok(())
    }

    /// The extent files that are not the image's own file, as (child name, file name).
    pub fn extent_children(&self) -> Vec<(String, String)> {
        self.extents
            .iter()
            .enumerate()
            .filter(|(_, e)| e.own_file)
            .map(|(i, e)| (format!("extents.{i}"), e.name.clone()))
            .collect()
    }

    fn info(&self) -> VmdkInfo {
        VmdkInfo {
            cid: self.cid.load(Ordering::Relaxed),
            parent_cid: self.parent_cid,
            create_type: self.create_type.clone(),
            extents: self
                .extents
                .iter()
                .map(|e| VmdkExtentInfo {
                    compressed: e.compressed().then_some(true),
                    virtual_size: e.len,
                    filename: e.name.clone(),
                    cluster_size: e.grain(),
                    format: e.kind_name.clone(),
                })
                .collect(),
        }
    }

    /// qemu's `cluster_size`: the first extent's grain when every extent is of its kind.
    fn common_grain(&self) -> Option<u64> {
        let first = self.extents.first()?;
        let same = self.extents.iter().all(|e| {
            e.grain().is_some() == first.grain().is_some()
                && e.compressed() == first.compressed()
                && e.grain() == first.grain()
        });
        if same {
            first.grain()
        } else {
            None
        }
    }

    /// The sparse extent covering the grain at guest offset `offset`, with the extent.
    fn stream_extent(&self, offset: u64) -> Result<(&Extent, &SparseExtent)> {
        let ext = self.extent_at(offset)?;
        match &ext.kind {
            ExtentKind::Sparse(s) => Ok((ext, s)),
            _ => {
                Err(Error::unsupported("compressed writes need a sparse extent")
                    .with_path(&self.path))
            }
        }
    }
}

/// Reads plainly stored bytes of `ext` at `host`; past the end of a flat extent's file,
/// zeros (qemu's file driver reads them so).
fn read_plain(ext: &Extent, buf: &mut [u8], host: u64) -> Result<()> {
    let flen = ext
        .storage
        .len()
        .map_err(|e| Error::io("Could not access file", e).with_path(&ext.path))?;
    let n = flen.saturating_sub(host).min(buf.len() as u64) as usize;
    if n < buf.len() && !matches!(ext.kind, ExtentKind::Flat(_)) {
        return Err(Error::corrupt(format!(
            "grain at offset {host} lies past the end of the file ({flen} bytes)"
        ))
        .with_path(&ext.path));
    }
    crate::block::read_host(ext.storage.as_ref(), &mut buf[..n], host).in_file(&ext.path)?;
    buf[n..].fill(0);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl BlockImage for VmdkImage {
    fn format(&self) -> ImageFormat {
        VMDK
    }

    fn filename(&self) -> &Path {
        &self.path
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_request(self.size, offset, buf.len() as u64).in_file(&self.path)?;
        self.read_layer(buf, offset.0, true)
    }

    fn read_stored(&self, buf: &mut [u8], guest: GuestOffset, _: &BlockStatus) -> Result<()> {
        check_request(self.size, guest, buf.len() as u64).in_file(&self.path)?;
        self.read_layer(buf, guest.0, false)
    }

    fn write_at(&self, buf: &[u8], offset: GuestOffset) -> Result<()> {
        self.write_range(Some(buf), offset.0, buf.len() as u64)
    }

    fn write_zeroes(&self, offset: GuestOffset, len: u64, _unmap: bool) -> Result<()> {
        self.write_range(None, offset.0, len)
    }

    /// As qemu's `vmdk_has_zero_init`: flat extents read as zeros only on files that do.
    fn zero_initialized(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<()> {
        // `-t unsafe` (convert's default, as qemu-img's): nothing waits for the disk.
        if !self.writable || self.unsafe_cache.load(Ordering::Relaxed) {
            return Ok(());
        }
        let files = self
            .desc_file
            .iter()
            .map(|s| (s.as_ref(), self.path.as_path()))
            .chain(
                self.extents
                    .iter()
                    .map(|e| (e.storage.as_ref(), e.path.as_path())),
            );
        for (s, p) in files {
            s.flush()
                .map_err(|e| Error::io("flush failed", e).with_path(p))?;
        }
        Ok(())
    }

    /// As qemu's `vmdk_co_block_status`: a grain is data (with its offset, or compressed),
    /// zeros (a zeroed grain), or unallocated (the parent's status); a flat extent is data,
    /// zero where its file has a hole.
    fn block_status(&self, offset: GuestOffset, max_len: u64) -> Result<BlockStatus> {
        let max_len = max_len.max(1);
        check_request(self.size, offset, max_len).in_file(&self.path)?;
        let ext = self.extent_at(offset.0)?;
        let off = offset.0 - ext.start;
        let m = ext.map(off, max_len)?;
        Ok(match m.mapping {
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset.0 < b.virtual_size() => {
                    let n = m.len.min(b.virtual_size() - offset.0);
                    let mut s = b.block_status(offset, n)?;
                    s.depth += 1;
                    s
                }
                _ => BlockStatus::unallocated(m.len, 0),
            },
            Mapping::Zero => BlockStatus::zero(m.len, 0, None),
            Mapping::Compressed(_) => BlockStatus::compressed(m.len, 0),
            Mapping::Data(h) if matches!(ext.kind, ExtentKind::Flat(_)) => {
                let (is_data, n) = ext
                    .storage
                    .extent_at(h.0)
                    .map_err(|e| Error::io("block status query failed", e).with_path(&ext.path))?;
                let mut s = BlockStatus::data(m.len.min(n).max(1), 0, h);
                s.zero = !is_data;
                s
            }
            Mapping::Data(h) => BlockStatus::data(m.len, 0, h),
        })
    }

    fn backing(&self) -> Option<&dyn BlockImage> {
        self.backing.as_deref()
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    /// The descriptor's file and every extent file in a file of its own.
    fn actual_size(&self) -> Option<u64> {
        let mut total = self.desc_storage()?.allocated_bytes()?;
        for e in self.extents.iter().filter(|e| e.own_file) {
            total += e.storage.allocated_bytes()?;
        }
        Some(total)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.common_grain()
    }

    fn set_unsafe_cache(&self, on: bool) {
        self.unsafe_cache.store(on, Ordering::Relaxed);
    }

    fn as_check(&self) -> Option<&dyn crate::check::Check> {
        Some(self)
    }

    fn as_compressed_writes(&self) -> Option<&dyn crate::capability::CompressedWrites> {
        Some(self)
    }

    fn needs_compressed_writes(&self) -> bool {
        self.extents.first().is_some_and(|e| e.compressed())
    }

    /// A stream-optimized disk appends its grains one at a time under its write lock, and a
    /// copy keeps its compressed grains in memory until they are appended in order: one
    /// prepared job waiting is enough to keep the compressing workers busy, and more would
    /// only hold memory (2 GiB qcow2 to streamOptimized on 2 cores: peak RSS 10.1-10.5 MB
    /// with two waiting, as many as workers, against qemu-img's 9.3 MB).
    fn serializes_writes(&self) -> bool {
        self.needs_compressed_writes()
    }

    fn file_of(&self, guest: GuestOffset) -> Option<String> {
        let e = self.extent_at(guest.0).ok()?;
        e.own_file.then(|| e.name.clone())
    }

    fn extra_files(&self) -> Vec<(String, String)> {
        self.extent_children()
    }

    fn layer_info(&self) -> Result<LayerInfo> {
        Ok(LayerInfo {
            filename: self.path.display().to_string(),
            format: VMDK.as_str(),
            virtual_size: self.size,
            actual_size: self.actual_size(),
            cluster_size: self.cluster_size(),
            encrypted: None,
            backing_filename: self.parent_hint.clone(),
            full_backing_filename: self.backing_path.as_ref().map(|p| p.display().to_string()),
            backing_filename_format: self.parent_hint.as_ref().map(|_| "vmdk".to_string()),
            backing_format_probed: false,
            snapshots: Vec::new(),
            dirty_flag: false,
            format_specific: Some(FormatSpecific::Vmdk(self.info())),
        })
    }
}

impl crate::capability::CompressedWrites for VmdkImage {
    fn compression_unit(&self) -> u64 {
        self.common_grain().unwrap_or(512)
    }

    fn compress(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.needs_compressed_writes() {
            true => sparse::compress(data).map(Some),
            // A plain extent stores the grain as it is (qemu's vmdk writes "compressed"
            // clusters plainly unless the extent compresses).
            false => Ok(None),
        }
    }

    fn write_compressed(&self, offset: GuestOffset, compressed: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported("the image is opened read-only").with_path(&self.path));
        }
        let mut cid_updated = lock(&self.writing);
        let (ext, s) = self.stream_extent(offset.0)?;
        if !s.compressed {
            return Err(Error::unsupported("this extent does not compress").with_path(&ext.path));
        }
        s.append_compressed(ext.storage.as_ref(), offset.0 - ext.start, compressed)
            .in_file(&ext.path)?;
        if !*cid_updated {
            self.write_new_cid()?;
            *cid_updated = true;
        }
        Ok(())
    }

    /// qemu's end of a compressed run: every extent file's length rounded up to a sector.
    fn finish_compressed(&self) -> Result<()> {
        for e in &self.extents {
            let len = e
                .storage
                .len()
                .map_err(|er| Error::io("Could not access file", er).with_path(&e.path))?;
            let want = len.div_ceil(512) * 512;
            if want != len {
                e.storage
                    .set_len(want)
                    .map_err(|er| Error::io("truncate failed", er).with_path(&e.path))?;
            }
        }
        Ok(())
    }
}

/// Opens arbitrary bytes as a one-file VMDK (monolithicSparse, streamOptimized) and reads
/// every block status and (a bounded part of) the disk: what the fuzz target
/// `vmdk_open_read` and its hostile-input tests run. Never panics, and allocates at most
/// about the input's size.
pub fn exercise(data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(crate::storage::MemStorage::new(data.to_vec()));
    let mut magic = [0u8; 4];
    if storage.read_at(&mut magic, 0).is_err() || &magic != header::MAGIC {
        return;
    }
    let Ok(Opened::Extent(e)) = SparseExtent::open(storage.as_ref(), false) else {
        return;
    };
    let size = e.capacity();
    let img = VmdkImage {
        path: PathBuf::from("fuzz.vmdk"),
        writable: false,
        extents: vec![Extent {
            storage,
            path: PathBuf::from("fuzz.vmdk"),
            name: "fuzz.vmdk".into(),
            kind_name: String::new(),
            start: 0,
            len: size,
            own_file: false,
            kind: ExtentKind::Sparse(e),
        }],
        size,
        desc_file: None,
        desc_offset: 0x200,
        create_type: "monolithicSparse".into(),
        cid: AtomicU32::new(0),
        parent_cid: 0,
        parent_hint: None,
        backing_path: None,
        backing: None,
        parent_valid: false,
        writing: Mutex::new(false),
        unsafe_cache: AtomicBool::new(false),
    };
    let _ = img.read_desc();
    let _ = img.layer_info();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(s) = img.block_status(GuestOffset(pos), size - pos) else {
            return;
        };
        let n = s.len.min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], GuestOffset(pos));
        pos += s.len;
    }
}
