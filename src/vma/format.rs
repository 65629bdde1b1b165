//! The on-disk structures of VMA version 1, declared once: the constants, the main header with
//! its blob buffer, and the extent header with its block-info entries.
//!
//! Every layout here follows the reference notes `vma.md` (sections "Constants", "Main header",
//! "Extents"); where Proxmox's `vma_spec.txt` disagrees, those notes win. All integers are
//! big-endian except the little-endian blob lengths. Parsing checks everything "What a reader
//! must reject" lists that can be seen in one structure; checks that need the whole stream
//! (duplicates, completeness) are in [`super::reader`].

use crate::error::{Error, Result};
use md5::{Digest, Md5};

/// Magic of the main header (vma.md "Main header", offset 0).
pub const MAGIC: [u8; 4] = *b"VMA\0";
/// Magic of an extent header (vma.md "Extents", offset 0).
pub const EXTENT_MAGIC: [u8; 4] = *b"VMAE";
/// The only format version (vma.md "Main header", offset 4).
pub const VERSION: u32 = 1;
/// A block: the unit of the extent masks (vma.md "Constants").
pub const BLOCK_SIZE: u64 = 4096;
/// A cluster: the unit a device is archived in, 16 blocks (vma.md "Constants").
pub const CLUSTER_SIZE: u64 = 65536;
/// Blocks per cluster (one mask bit each).
pub const BLOCKS_PER_CLUSTER: usize = 16;
/// Size of an extent header (vma.md "Extents").
pub const EXTENT_HEADER_SIZE: usize = 512;
/// Most block-info entries an extent header holds (vma.md "Constants": readers accept 59).
pub const MAX_EXTENT_ENTRIES: usize = 59;
/// Entries per extent vimg writes: Proxmox's writer flushes at 58, so vimg does too and its
/// extents look like Proxmox's (entry 58 always zero).
pub const WRITER_EXTENT_ENTRIES: usize = 58;
/// Most data bytes one extent can carry (every block of every entry).
pub const MAX_EXTENT_DATA: usize = MAX_EXTENT_ENTRIES * CLUSTER_SIZE as usize;
/// Config slots in the main header (vma.md "Constants").
pub const MAX_CONFIGS: usize = 256;
/// Device slots in the main header; ids 1..=254 are used (vma.md "Constants").
pub const DEV_SLOTS: usize = 256;
/// Most devices in one archive (ids 1 to 254).
pub const MAX_DEVICES: usize = 254;
/// The fixed part of the main header; the blob buffer follows it (vma.md "Main header").
pub const HEADER_FIXED_SIZE: usize = 12288;
/// Longest blob: its length is a 16-bit field (vma.md "Main header", blob buffer).
pub const MAX_BLOB_LEN: usize = 65535;
/// Largest blob buffer that can be needed: the unused byte 0, then a name and data for every
/// config slot and a name for every device, each of the longest length.
pub const MAX_BLOB_BUFFER: usize = 1 + (2 * MAX_CONFIGS + MAX_DEVICES) * (2 + MAX_BLOB_LEN);
/// Largest `header_size` a reader accepts: the fixed part and the largest blob buffer,
/// rounded up to 512. Anything larger cannot be a valid archive, so no more is ever read.
pub const MAX_HEADER_SIZE: usize = HEADER_FIXED_SIZE + MAX_BLOB_BUFFER.div_ceil(512) * 512;
/// Largest device: cluster numbers are 32 bits (vma.md "Extents", blockinfo bits 31..0).
pub const MAX_DEVICE_SIZE: u64 = (1u64 << 32) * CLUSTER_SIZE;
/// The device name reserved for the VM's RAM state (vma.md "Main header").
pub const VMSTATE_NAME: &str = "vmstate";

/// Byte offsets of the main header's fields (vma.md "Main header").
mod off {
    pub const VERSION: usize = 4;
    pub const UUID: usize = 8;
    pub const CTIME: usize = 24;
    pub const MD5: usize = 32;
    pub const BLOB_OFFSET: usize = 48;
    pub const BLOB_SIZE: usize = 52;
    pub const HEADER_SIZE: usize = 56;
    pub const CONFIG_NAMES: usize = 2044;
    pub const CONFIG_DATA: usize = 3068;
    pub const DEV_INFO: usize = 4096;
    /// Size of one dev_info record.
    pub const DEV_INFO_SIZE: usize = 32;
}

/// Number of clusters of a device of `size` bytes (the last one may be partial).
pub fn cluster_count(size: u64) -> u64 {
    size.div_ceil(CLUSTER_SIZE)
}

/// A device (drive) recorded in the main header (vma.md "Main header", dev_info).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id, 1 to 254: the slot in dev_info, and what block-info entries name.
    pub id: u8,
    /// Its name (without the terminating NUL), e.g. `drive-scsi0`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

impl DeviceInfo {
    /// Number of clusters the device has in the archive.
    pub fn clusters(&self) -> u64 {
        cluster_count(self.size)
    }

    /// Whether this is the VM state stream rather than a disk.
    pub fn is_vmstate(&self) -> bool {
        self.name == VMSTATE_NAME
    }
}

/// A config file stored in the main header (vma.md "Main header", config_names/config_data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    /// Its name, a base name such as `qemu-server.conf`.
    pub name: String,
    /// Its contents.
    pub data: Vec<u8>,
}

impl ConfigFile {
    /// Reads config file `path`, to be stored by its base name; a file larger than an
    /// archive's blob holds is refused.
    pub fn read(path: &std::path::Path) -> Result<ConfigFile> {
        use std::io::Read;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::invalid_input("config file has no base name usable in an archive")
                    .with_path(path)
            })?
            .to_string();
        let file = std::fs::File::open(path)
            .map_err(|e| Error::io("cannot open config file", e).with_path(path))?;
        let mut data = Vec::new();
        // One byte more than a blob holds, to tell a file that is too large.
        file.take(MAX_BLOB_LEN as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| Error::io("cannot read config file", e).with_path(path))?;
        if data.len() > MAX_BLOB_LEN {
            return Err(Error::invalid_input(format!(
                "config file is larger than the {MAX_BLOB_LEN} bytes an archive stores"
            ))
            .with_path(path));
        }
        Ok(ConfigFile { name, data })
    }
}

/// The main header of an archive: what it holds, before any cluster (vma.md "Main header").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveHeader {
    /// The archive's uuid; every extent repeats it.
    pub uuid: [u8; 16],
    /// Creation time, seconds since the epoch.
    pub ctime: i64,
    /// Config files, in slot order.
    pub configs: Vec<ConfigFile>,
    /// Devices, by increasing id.
    pub devices: Vec<DeviceInfo>,
}

impl ArchiveHeader {
    /// An empty header with `uuid` and `ctime`.
    pub fn new(uuid: [u8; 16], ctime: i64) -> Self {
        ArchiveHeader {
            uuid,
            ctime,
            configs: Vec::new(),
            devices: Vec::new(),
        }
    }

    /// Adds a config file; `name` must be a non-empty name without NUL, and neither it nor
    /// `data` may be longer than a blob allows. Names must be unique.
    pub fn add_config(&mut self, name: &str, data: Vec<u8>) -> Result<()> {
        check_name(name, "config name")?;
        if self.configs.len() >= MAX_CONFIGS {
            return Err(Error::invalid_input(format!(
                "too many config files: an archive holds at most {MAX_CONFIGS}"
            )));
        }
        if data.len() > MAX_BLOB_LEN {
            return Err(Error::invalid_input(format!(
                "config file '{name}' is {} bytes; an archive stores at most {MAX_BLOB_LEN}",
                data.len()
            )));
        }
        if self.configs.iter().any(|c| c.name == name) {
            return Err(Error::invalid_input(format!(
                "config file '{name}' given twice"
            )));
        }
        self.configs.push(ConfigFile {
            name: name.to_string(),
            data,
        });
        Ok(())
    }

    /// Adds a device of `size` bytes (at most [`MAX_DEVICE_SIZE`], not zero) and returns its
    /// id. Names must be unique.
    pub fn add_device(&mut self, name: &str, size: u64) -> Result<u8> {
        check_name(name, "device name")?;
        if self.devices.len() >= MAX_DEVICES {
            return Err(Error::invalid_input(format!(
                "too many devices: an archive holds at most {MAX_DEVICES}"
            )));
        }
        if size == 0 || size > MAX_DEVICE_SIZE {
            return Err(Error::invalid_input(format!(
                "device '{name}' has size {size}; VMA devices are 1 byte to {MAX_DEVICE_SIZE} bytes"
            )));
        }
        if self.devices.iter().any(|d| d.name == name) {
            return Err(Error::invalid_input(format!(
                "device name '{name}' given twice"
            )));
        }
        let id = self.devices.len() as u8 + 1;
        self.devices.push(DeviceInfo {
            id,
            name: name.to_string(),
            size,
        });
        Ok(id)
    }

    /// The device with id `id`, if there is one.
    pub fn device(&self, id: u8) -> Option<&DeviceInfo> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The config file named `name`, if there is one.
    pub fn config(&self, name: &str) -> Option<&ConfigFile> {
        self.configs.iter().find(|c| c.name == name)
    }

    /// Lays the header out as it goes on disk: the fixed part, the blob buffer (configs'
    /// names and data, then device names), zero padding to a multiple of 512, and the md5 over
    /// all of it with the md5 field zeroed (vma.md "Main header").
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut blob = vec![0u8]; // offset 0 is never used: a pointer 0 means none
        let mut put = |bytes: &[u8], nul: bool| -> Result<u32> {
            let len = bytes.len() + nul as usize;
            if len > MAX_BLOB_LEN {
                return Err(Error::invalid_input(format!(
                    "a name or config of {len} bytes does not fit a VMA blob ({MAX_BLOB_LEN} at most)"
                )));
            }
            let at = blob.len() as u32;
            blob.extend_from_slice(&(len as u16).to_le_bytes());
            blob.extend_from_slice(bytes);
            if nul {
                blob.push(0);
            }
            Ok(at)
        };
        let mut names = Vec::with_capacity(self.configs.len());
        for c in &self.configs {
            names.push((put(c.name.as_bytes(), true)?, put(&c.data, false)?));
        }
        let mut devs = Vec::with_capacity(self.devices.len());
        for d in &self.devices {
            devs.push((d.id, put(d.name.as_bytes(), true)?, d.size));
        }
        let header_size = HEADER_FIXED_SIZE + blob.len().div_ceil(512) * 512;
        let mut h = vec![0u8; header_size];
        h[..4].copy_from_slice(&MAGIC);
        put_u32(&mut h, off::VERSION, VERSION);
        h[off::UUID..off::UUID + 16].copy_from_slice(&self.uuid);
        h[off::CTIME..off::CTIME + 8].copy_from_slice(&self.ctime.to_be_bytes());
        put_u32(&mut h, off::BLOB_OFFSET, HEADER_FIXED_SIZE as u32);
        put_u32(&mut h, off::BLOB_SIZE, blob.len() as u32);
        put_u32(&mut h, off::HEADER_SIZE, header_size as u32);
        for (i, (n, d)) in names.into_iter().enumerate() {
            put_u32(&mut h, off::CONFIG_NAMES + 4 * i, n);
            put_u32(&mut h, off::CONFIG_DATA + 4 * i, d);
        }
        for (id, name, size) in devs {
            let at = off::DEV_INFO + off::DEV_INFO_SIZE * id as usize;
            put_u32(&mut h, at, name);
            h[at + 8..at + 16].copy_from_slice(&size.to_be_bytes());
        }
        h[HEADER_FIXED_SIZE..HEADER_FIXED_SIZE + blob.len()].copy_from_slice(&blob);
        let sum = Md5::digest(&h);
        h[off::MD5..off::MD5 + 16].copy_from_slice(&sum);
        Ok(h)
    }

    /// The `header_size` recorded in the first [`HEADER_FIXED_SIZE`] bytes of an archive,
    /// checked: the magic, the version, and a size that is a multiple of 512, larger than the
    /// fixed part and at most [`MAX_HEADER_SIZE`] (vma.md "What a reader must reject").
    pub fn header_size(fixed: &[u8]) -> Result<usize> {
        if fixed.len() < HEADER_FIXED_SIZE {
            return Err(Error::corrupt(format!(
                "archive is too short for a VMA header ({} of {HEADER_FIXED_SIZE} bytes)",
                fixed.len()
            )));
        }
        if fixed[..4] != MAGIC {
            return Err(Error::corrupt("not a VMA archive (bad magic)").at(0));
        }
        let version = be32(fixed, off::VERSION);
        if version != VERSION {
            return Err(Error::unsupported(format!(
                "VMA version {version} is not supported (only version {VERSION})"
            ))
            .at(off::VERSION as u64));
        }
        let size = be32(fixed, off::HEADER_SIZE) as usize;
        if size <= HEADER_FIXED_SIZE || !size.is_multiple_of(512) || size > MAX_HEADER_SIZE {
            return Err(Error::corrupt(format!(
                "invalid header_size {size}: must be a multiple of 512 above {HEADER_FIXED_SIZE} \
                 and at most {MAX_HEADER_SIZE}"
            ))
            .at(off::HEADER_SIZE as u64));
        }
        Ok(size)
    }

    /// Parses and checks a whole main header (`bytes` is exactly `header_size` bytes): magic,
    /// version, size, md5, blob pointers inside the blob buffer, names ending with NUL, the
    /// devices' sizes and the uniqueness of their names.
    pub fn parse(bytes: &[u8]) -> Result<ArchiveHeader> {
        let size = Self::header_size(bytes)?;
        if bytes.len() != size {
            return Err(Error::corrupt(format!(
                "archive ends inside its header ({} of {size} bytes)",
                bytes.len()
            )));
        }
        let mut zeroed = bytes.to_vec();
        zeroed[off::MD5..off::MD5 + 16].fill(0);
        if Md5::digest(&zeroed)[..] != bytes[off::MD5..off::MD5 + 16] {
            return Err(Error::corrupt("md5 checksum mismatch in the main header").at(0));
        }
        let blob_off = be32(bytes, off::BLOB_OFFSET) as usize;
        let blob_size = be32(bytes, off::BLOB_SIZE) as usize;
        if blob_off < HEADER_FIXED_SIZE || blob_off.saturating_add(blob_size) > size {
            return Err(Error::corrupt(format!(
                "blob buffer [{blob_off}, +{blob_size}) lies outside the {size}-byte header"
            ))
            .at(off::BLOB_OFFSET as u64));
        }
        let blobs = Blobs {
            buf: &bytes[blob_off..blob_off + blob_size],
            base: blob_off as u64,
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[off::UUID..off::UUID + 16]);
        let ctime = i64::from_be_bytes(
            bytes[off::CTIME..off::CTIME + 8]
                .try_into()
                .unwrap_or([0; 8]),
        );
        let mut header = ArchiveHeader::new(uuid, ctime);
        for i in 0..MAX_CONFIGS {
            let name_at = off::CONFIG_NAMES + 4 * i;
            let data_at = off::CONFIG_DATA + 4 * i;
            let (n, d) = (be32(bytes, name_at), be32(bytes, data_at));
            if n == 0 && d == 0 {
                continue;
            }
            if n == 0 || d == 0 {
                return Err(Error::corrupt(format!(
                    "config slot {i} has a {} but no {}",
                    if n == 0 { "data blob" } else { "name" },
                    if n == 0 { "name" } else { "data blob" }
                ))
                .at(if n == 0 { name_at } else { data_at } as u64));
            }
            let name = blobs.name(n, &format!("config slot {i}"))?;
            let data = blobs.get(d, &format!("config '{name}'"))?.to_vec();
            if header.configs.iter().any(|c| c.name == name) {
                return Err(
                    Error::corrupt(format!("config name '{name}' appears twice"))
                        .at(name_at as u64),
                );
            }
            header.configs.push(ConfigFile { name, data });
        }
        for id in 0..DEV_SLOTS {
            let at = off::DEV_INFO + off::DEV_INFO_SIZE * id;
            let name_ptr = be32(bytes, at);
            let dev_size = u64::from_be_bytes(bytes[at + 8..at + 16].try_into().unwrap_or([0; 8]));
            if name_ptr == 0 && dev_size == 0 {
                continue;
            }
            if name_ptr == 0 || dev_size == 0 {
                // The reference reader ignores a slot with only one of the two set; it
                // describes no device.
                continue;
            }
            if id == 0 || id > MAX_DEVICES {
                return Err(Error::corrupt(format!(
                    "device slot {id} is in use; device ids are 1 to {MAX_DEVICES}"
                ))
                .at(at as u64));
            }
            let name = blobs.name(name_ptr, &format!("device {id}"))?;
            if dev_size > MAX_DEVICE_SIZE {
                return Err(Error::corrupt(format!(
                    "device {id} ('{name}') claims {dev_size} bytes, more than the \
                     {MAX_DEVICE_SIZE} bytes 32-bit cluster numbers can address"
                ))
                .at(at as u64 + 8));
            }
            if let Some(other) = header.devices.iter().find(|d| d.name == name) {
                return Err(Error::corrupt(format!(
                    "device name '{name}' is used by devices {} and {id}",
                    other.id
                ))
                .at(at as u64));
            }
            header.devices.push(DeviceInfo {
                id: id as u8,
                name,
                size: dev_size,
            });
        }
        Ok(header)
    }
}

/// The blob buffer of a header being parsed.
struct Blobs<'a> {
    buf: &'a [u8],
    /// Offset of the buffer in the header, for messages.
    base: u64,
}

impl Blobs<'_> {
    /// The blob at `ptr`, checked to lie inside the buffer (vma.md "Main header", blob buffer).
    fn get(&self, ptr: u32, what: &str) -> Result<&[u8]> {
        let p = ptr as usize;
        let bad = || {
            Error::corrupt(format!(
                "{what}: blob pointer {ptr} lies outside the {}-byte blob buffer",
                self.buf.len()
            ))
            .at(self.base + ptr as u64)
        };
        let len_bytes = self
            .buf
            .get(p..p.checked_add(2).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        let len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
        self.buf.get(p + 2..p + 2 + len).ok_or_else(bad)
    }

    /// The NUL-terminated UTF-8 name at `ptr`, without its NUL.
    fn name(&self, ptr: u32, what: &str) -> Result<String> {
        let b = self.get(ptr, what)?;
        let at = self.base + ptr as u64;
        let Some((&0, text)) = b.split_last() else {
            return Err(Error::corrupt(format!("{what}: name does not end with NUL")).at(at));
        };
        if text.is_empty() || text.contains(&0) {
            return Err(
                Error::corrupt(format!("{what}: name is empty or holds a NUL byte")).at(at),
            );
        }
        String::from_utf8(text.to_vec())
            .map_err(|_| Error::corrupt(format!("{what}: name is not valid UTF-8")).at(at))
    }
}

/// Checks a name given to the writer: not empty, no NUL, short enough for a blob.
fn check_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') || name.len() + 1 > MAX_BLOB_LEN {
        return Err(Error::invalid_input(format!(
            "invalid {what} '{}': must be 1 to {} bytes without NUL",
            name.escape_debug(),
            MAX_BLOB_LEN - 1
        )));
    }
    Ok(())
}

/// A block-info entry of an extent (vma.md "Extents", blockinfo u64): which cluster of which
/// device, and which of its 16 blocks follow as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockInfo {
    /// Bit j set: block j of the cluster holds data and follows in the extent.
    pub mask: u16,
    /// The device, 1 to 254 (0 marks an unused entry).
    pub dev_id: u8,
    /// The cluster number within the device.
    pub cluster: u32,
}

impl BlockInfo {
    /// The entry as stored: mask in bits 63..48, dev_id in 39..32, cluster in 31..0.
    pub fn encode(self) -> u64 {
        (self.mask as u64) << 48 | (self.dev_id as u64) << 32 | self.cluster as u64
    }

    /// Splits a stored entry; `None` if its reserved bits 47..40 are not zero.
    pub fn decode(v: u64) -> Option<BlockInfo> {
        if (v >> 40) & 0xff != 0 {
            return None;
        }
        Some(BlockInfo {
            mask: (v >> 48) as u16,
            dev_id: (v >> 32) as u8,
            cluster: v as u32,
        })
    }

    /// Number of data blocks the entry says follow.
    pub fn blocks(self) -> usize {
        self.mask.count_ones() as usize
    }
}

/// Byte offsets of the extent header's fields (vma.md "Extents").
mod ext {
    pub const RESERVED: usize = 4;
    pub const BLOCK_COUNT: usize = 6;
    pub const UUID: usize = 8;
    pub const MD5: usize = 24;
    pub const ENTRIES: usize = 40;
}

/// Lays out an extent header for `entries` (at most [`MAX_EXTENT_ENTRIES`]) in `out`, with
/// the block count their masks add up to and the md5 over the header with the md5 field
/// zeroed (vma.md "Extents").
pub fn encode_extent_header(uuid: &[u8; 16], entries: &[u64], out: &mut [u8]) {
    let out = &mut out[..EXTENT_HEADER_SIZE];
    out.fill(0);
    out[..4].copy_from_slice(&EXTENT_MAGIC);
    let blocks: u32 = entries.iter().map(|&e| (e >> 48).count_ones()).sum();
    out[ext::BLOCK_COUNT..ext::BLOCK_COUNT + 2].copy_from_slice(&(blocks as u16).to_be_bytes());
    out[ext::UUID..ext::UUID + 16].copy_from_slice(uuid);
    for (i, e) in entries.iter().take(MAX_EXTENT_ENTRIES).enumerate() {
        let at = ext::ENTRIES + 8 * i;
        out[at..at + 8].copy_from_slice(&e.to_be_bytes());
    }
    let sum = Md5::digest(&*out);
    out[ext::MD5..ext::MD5 + 16].copy_from_slice(&sum);
}

/// Parses and checks an extent header: magic, reserved field, uuid equal to `uuid`, md5,
/// reserved bits of each entry, unused entries all zero, and a block count equal to the
/// masks' bits. Pushes the used entries onto `entries` (cleared first) and returns the block
/// count. Errors carry offsets relative to the header's start.
pub fn parse_extent_header(
    h: &[u8],
    uuid: &[u8; 16],
    entries: &mut Vec<BlockInfo>,
) -> Result<usize> {
    entries.clear();
    if h.len() < EXTENT_HEADER_SIZE {
        return Err(Error::corrupt(format!(
            "archive ends inside an extent header ({} of {EXTENT_HEADER_SIZE} bytes)",
            h.len()
        )));
    }
    let h = &h[..EXTENT_HEADER_SIZE];
    if h[..4] != EXTENT_MAGIC {
        return Err(Error::corrupt("bad extent magic (expected 'VMAE')").at(0));
    }
    let mut zeroed = [0u8; EXTENT_HEADER_SIZE];
    zeroed.copy_from_slice(h);
    zeroed[ext::MD5..ext::MD5 + 16].fill(0);
    if Md5::digest(zeroed)[..] != h[ext::MD5..ext::MD5 + 16] {
        return Err(Error::corrupt("md5 checksum mismatch in extent header").at(ext::MD5 as u64));
    }
    if h[ext::RESERVED..ext::RESERVED + 2] != [0, 0] {
        return Err(
            Error::corrupt("reserved field of extent header is not zero").at(ext::RESERVED as u64),
        );
    }
    if h[ext::UUID..ext::UUID + 16] != uuid[..] {
        return Err(
            Error::corrupt("extent uuid differs from the archive's uuid").at(ext::UUID as u64),
        );
    }
    let block_count = u16::from_be_bytes([h[ext::BLOCK_COUNT], h[ext::BLOCK_COUNT + 1]]) as usize;
    let mut sum = 0usize;
    for i in 0..MAX_EXTENT_ENTRIES {
        let at = ext::ENTRIES + 8 * i;
        let v = u64::from_be_bytes(h[at..at + 8].try_into().unwrap_or([0; 8]));
        let Some(info) = BlockInfo::decode(v) else {
            return Err(Error::corrupt(format!(
                "reserved bits of block-info entry {i} are not zero"
            ))
            .at(at as u64));
        };
        if info.dev_id == 0 {
            if v != 0 {
                return Err(Error::corrupt(format!(
                    "unused block-info entry {i} (device 0) is not all zero"
                ))
                .at(at as u64));
            }
            continue;
        }
        sum += info.blocks();
        entries.push(info);
    }
    if sum != block_count {
        return Err(Error::corrupt(format!(
            "extent header says {block_count} blocks follow, its entries' masks say {sum}"
        ))
        .at(ext::BLOCK_COUNT as u64));
    }
    Ok(block_count)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ArchiveHeader {
        let mut h = ArchiveHeader::new([7; 16], 1_700_000_000);
        h.add_config("qemu-server.conf", b"memory: 512\n".to_vec())
            .unwrap();
        h.add_device("drive-scsi0", 1 << 20).unwrap();
        h.add_device("drive-virtio1", 4096 * 3 + 512).unwrap();
        h
    }

    #[test]
    fn header_round_trips_and_is_laid_out_as_documented() {
        let h = sample();
        let b = h.encode().unwrap();
        assert_eq!(&b[..4], b"VMA\0");
        assert_eq!(be32(&b, 4), 1);
        assert_eq!(be32(&b, 48), 12288);
        let blob_size = be32(&b, 52) as usize;
        // 1 unused byte, then 2+17, 2+12, 2+12, 2+14 bytes of blobs.
        assert_eq!(blob_size, 1 + 19 + 14 + 14 + 16);
        assert_eq!(be32(&b, 56) as usize, 12288 + 512);
        assert_eq!(b.len(), 12288 + 512);
        // The first config's name blob is at offset 1: LE length 17, then the name and NUL.
        assert_eq!(be32(&b, 2044), 1);
        assert_eq!(&b[12289..12291], &17u16.to_le_bytes());
        assert_eq!(&b[12291..12308], b"qemu-server.conf\0");
        // Device 1's record at 4096 + 32.
        assert_eq!(
            u64::from_be_bytes(b[4136..4144].try_into().unwrap()),
            1 << 20
        );
        assert_eq!(ArchiveHeader::parse(&b).unwrap(), h);
    }

    #[test]
    fn header_damage_is_refused_by_name() {
        let good = sample().encode().unwrap();
        let expect = |b: &[u8], what: &str| {
            let e = ArchiveHeader::parse(b).unwrap_err();
            assert!(e.to_string().contains(what), "{e} lacks {what}");
        };
        let mut b = good.clone();
        b[0] = b'X';
        expect(&b, "bad magic");
        let mut b = good.clone();
        b[7] = 2;
        expect(&b, "version 2");
        let mut b = good.clone();
        b[100] ^= 1;
        expect(&b, "md5");
        let mut b = good.clone();
        put_u32(&mut b, 56, 12288);
        expect(&b, "header_size");
        let mut b = good.clone();
        put_u32(&mut b, 56, 12288 + 511);
        expect(&b, "header_size");
        expect(&good[..good.len() - 1], "ends inside its header");
        // A pointer past the blob buffer, with a correct md5.
        let mut b = good.clone();
        put_u32(&mut b, 4096 + 32, 400);
        fix_md5(&mut b);
        expect(&b, "outside the");
        // A name without NUL.
        let mut b = good.clone();
        b[12291 + 16] = b'x';
        fix_md5(&mut b);
        expect(&b, "does not end with NUL");
    }

    fn fix_md5(b: &mut [u8]) {
        b[32..48].fill(0);
        let s = Md5::digest(&*b);
        b[32..48].copy_from_slice(&s);
    }

    #[test]
    fn extent_header_round_trips_and_checks() {
        let uuid = [3u8; 16];
        let e = [
            BlockInfo {
                mask: 0xffff,
                dev_id: 1,
                cluster: 5,
            }
            .encode(),
            BlockInfo {
                mask: 0b101,
                dev_id: 2,
                cluster: 0,
            }
            .encode(),
        ];
        let mut h = [0u8; 512];
        encode_extent_header(&uuid, &e, &mut h);
        let mut out = Vec::new();
        assert_eq!(parse_extent_header(&h, &uuid, &mut out).unwrap(), 18);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].mask, 0b101);
        assert!(parse_extent_header(&h, &[4u8; 16], &mut out)
            .unwrap_err()
            .to_string()
            .contains("uuid"));
        let mut bad = h;
        bad[41] ^= 0x80;
        assert!(parse_extent_header(&bad, &uuid, &mut out)
            .unwrap_err()
            .to_string()
            .contains("md5"));
    }
}
