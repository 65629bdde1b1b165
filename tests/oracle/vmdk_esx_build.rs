//! Builders of ESXi snapshot deltas (vmfsSparse "COWD" and seSparse extents), written from
//! the layouts qemu's `block/vmdk.c` and libyal's libvmdk notes describe (qemu cannot create
//! either), and of the chain ESXi makes around them: a flat base (`base.vmdk`, createType
//! "vmfs", over `base-flat.vmdk`) and the delta's descriptor naming it in
//! `parentFileNameHint`. Shared by tests/oracle/vmdk_esx.rs and tests/hostile/vmdk_esx.rs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;

/// What a grain of an seSparse delta holds.
#[derive(Debug, Clone)]
pub enum Grain {
    /// Stored data (4 KiB).
    Data(Vec<u8>),
    /// A zero grain (GT entry type 2).
    Zero,
    /// An unmapped grain (GT entry type 1, reads as zeros).
    Unmapped,
}

fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

/// Where the parts of a built seSparse file are, in sectors.
#[derive(Debug, Clone, Copy)]
pub struct SeLayout {
    pub volatile: u64,
    pub gd: u64,
    pub gd_size: u64,
    pub gts: u64,
    pub grains: u64,
}

/// An seSparse extent of `capacity` sectors holding `grains` (guest grain index, content),
/// whose data grains are stored in the order listed from grain index `first_index` on (so
/// that an index past 4095 tests the split encoding), and grain tables in reverse order of
/// first use (so a GT's index differs from its GD entry's).
pub fn sesparse(capacity: u64, grains: &[(u64, Grain)], first_index: u64) -> (Vec<u8>, SeLayout) {
    let gt_cover = 4096 * 8; // sectors
    let gd_entries = capacity.div_ceil(gt_cover);
    let gd_size = (gd_entries * 8).div_ceil(SECTOR).max(1);
    let mut used: Vec<u64> = Vec::new();
    for (g, _) in grains {
        let gi = g * 8 / gt_cover;
        if !used.contains(&gi) {
            used.push(gi);
        }
    }
    let n_gts = used.len() as u64;
    let gd = 4;
    let gts = gd + gd_size;
    let free_bitmap = gts + n_gts * 64;
    let backmap = free_bitmap + 1;
    let grains_at = (backmap + 1).div_ceil(8) * 8;
    let n_data = grains
        .iter()
        .filter(|(_, g)| matches!(g, Grain::Data(_)))
        .count() as u64;
    let grains_size = (first_index + n_data) * 8;
    let len = (grains_at + grains_size) * SECTOR;
    let mut f = vec![0u8; len as usize];
    // Constant header.
    put64(&mut f, 0, 0xcafe_babe);
    put64(&mut f, 8, 0x0000_0002_0000_0001);
    put64(&mut f, 16, capacity);
    put64(&mut f, 24, 8);
    put64(&mut f, 32, 64);
    put64(&mut f, 80, 1); // volatile header
    put64(&mut f, 88, 1);
    put64(&mut f, 96, 2); // journal header
    put64(&mut f, 104, 1);
    put64(&mut f, 112, 3); // journal
    put64(&mut f, 120, 1);
    put64(&mut f, 128, gd);
    put64(&mut f, 136, gd_size);
    put64(&mut f, 144, gts);
    put64(&mut f, 152, n_gts * 64);
    put64(&mut f, 160, free_bitmap);
    put64(&mut f, 168, 1);
    put64(&mut f, 176, backmap);
    put64(&mut f, 184, 1);
    put64(&mut f, 192, grains_at);
    put64(&mut f, 200, grains_size);
    // Volatile header.
    put64(&mut f, SECTOR, 0xcafe_cafe);
    put64(&mut f, SECTOR + 8, n_gts);
    put64(&mut f, SECTOR + 16, 1);
    // Grain directory and tables: GT number (n_gts - 1 - k) for the k-th used.
    for (k, gi) in used.iter().enumerate() {
        let gt_number = n_gts - 1 - k as u64;
        put64(
            &mut f,
            gd * SECTOR + gi * 8,
            0x1000_0000_0000_0000 | gt_number,
        );
    }
    let mut next = first_index;
    for (g, grain) in grains {
        let gi = g * 8 / gt_cover;
        let k = used.iter().position(|u| *u == gi).unwrap() as u64;
        let gt_at = (gts + (n_gts - 1 - k) * 64) * SECTOR;
        let entry_at = gt_at + (g % 4096) * 8;
        let entry = match grain {
            Grain::Zero => 0x2000_0000_0000_0000,
            Grain::Unmapped => 0x1000_0000_0000_0000,
            Grain::Data(bytes) => {
                let idx = next;
                next += 1;
                let at = ((grains_at + idx * 8) * SECTOR) as usize;
                f[at..at + 4096].copy_from_slice(bytes);
                0x3000_0000_0000_0000 | ((idx & 0xfff) << 48) | (idx >> 12)
            }
        };
        put64(&mut f, entry_at, entry);
    }
    let layout = SeLayout {
        volatile: 1,
        gd,
        gd_size,
        gts,
        grains: grains_at,
    };
    (f, layout)
}

/// Where the parts of a built COWD file are, in sectors.
#[derive(Debug, Clone, Copy)]
pub struct CowdLayout {
    pub gd: u64,
    pub gd_entries: u64,
    pub gts: u64,
    pub grains: u64,
}

/// A vmfsSparse (COWD) extent of `capacity` sectors with grains of `granularity` sectors,
/// holding the data `grains` (guest grain index, bytes) stored in the order listed, and grain
/// tables in reverse order of first use.
pub fn cowd(capacity: u32, granularity: u32, grains: &[(u64, Vec<u8>)]) -> (Vec<u8>, CowdLayout) {
    let gran = u64::from(granularity);
    let gt_cover = 4096 * gran; // sectors
    let gd_entries = u64::from(capacity).div_ceil(gt_cover);
    let gd = 4;
    let gd_sectors = (gd_entries * 4).div_ceil(SECTOR).max(1);
    let mut used: Vec<u64> = Vec::new();
    for (g, _) in grains {
        let gi = g / 4096;
        if !used.contains(&gi) {
            used.push(gi);
        }
    }
    let n_gts = used.len() as u64;
    let gts = gd + gd_sectors;
    let grains_at = gts + n_gts * 32;
    let len = (grains_at + grains.len() as u64 * gran) * SECTOR;
    let mut f = vec![0u8; len as usize];
    f[..4].copy_from_slice(b"COWD");
    put32(&mut f, 4, 1); // version
    put32(&mut f, 8, 3); // flags
    put32(&mut f, 12, capacity);
    put32(&mut f, 16, granularity);
    put32(&mut f, 20, gd as u32);
    put32(&mut f, 24, gd_entries as u32);
    put32(&mut f, 28, (len / SECTOR) as u32); // next free sector
    for (k, gi) in used.iter().enumerate() {
        let gt_sector = gts + (n_gts - 1 - k as u64) * 32;
        put32(&mut f, gd * SECTOR + gi * 4, gt_sector as u32);
    }
    for (n, (g, bytes)) in grains.iter().enumerate() {
        let k = used.iter().position(|u| *u == g / 4096).unwrap() as u64;
        let gt_at = (gts + (n_gts - 1 - k) * 32) * SECTOR;
        let sector = grains_at + n as u64 * gran;
        put32(&mut f, gt_at + (g % 4096) * 4, sector as u32);
        let at = (sector * SECTOR) as usize;
        f[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let layout = CowdLayout {
        gd,
        gd_entries,
        gts,
        grains: grains_at,
    };
    (f, layout)
}

/// The CIDs of the built chain (the delta's parentCID is the base's CID, which qemu checks
/// before reading the parent).
const BASE_CID: &str = "1a2b3c4d";
const DELTA_CID: &str = "5e6f7a8b";

/// The paths of a built chain.
pub struct Chain {
    /// The base's descriptor (`base.vmdk`).
    pub base: PathBuf,
    /// The base's flat data (`base-flat.vmdk`).
    pub base_flat: PathBuf,
    /// The delta's descriptor.
    pub delta: PathBuf,
    /// The delta's extent file.
    pub extent: PathBuf,
}

/// Writes in `dir` a flat base holding `base` and, over it, a delta of `create_type`
/// ("vmfsSparse" or "seSparse", extent type `extent_type`) whose extent file holds `extent`.
pub fn write_chain(
    dir: &Path,
    base: &[u8],
    create_type: &str,
    extent_type: &str,
    extent: &[u8],
) -> Chain {
    let sectors = base.len() as u64 / SECTOR;
    let ddb = "# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n\
               ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\n\
               ddb.virtualHWVersion = \"14\"\n";
    let chain = Chain {
        base: dir.join("base.vmdk"),
        base_flat: dir.join("base-flat.vmdk"),
        delta: dir.join("delta.vmdk"),
        extent: dir.join(format!("delta-{}.vmdk", create_type.to_lowercase())),
    };
    std::fs::write(&chain.base_flat, base).unwrap();
    std::fs::write(
        &chain.base,
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={BASE_CID}\n\
             parentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\n\
             RW {sectors} VMFS \"base-flat.vmdk\"\n\n{ddb}"
        ),
    )
    .unwrap();
    std::fs::write(&chain.extent, extent).unwrap();
    let extent_name = chain.extent.file_name().unwrap().to_str().unwrap();
    std::fs::write(
        &chain.delta,
        format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={DELTA_CID}\n\
             parentCID={BASE_CID}\ncreateType=\"{create_type}\"\n\
             parentFileNameHint=\"base.vmdk\"\n\n# Extent description\n\
             RW {sectors} {extent_type} \"{extent_name}\"\n\n{ddb}"
        ),
    )
    .unwrap();
    chain
}
