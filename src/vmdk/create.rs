//! Creating VMDK disks as `qemu-img create -f vmdk` does (qemu's `vmdk_co_do_create`): the
//! subformats monolithicSparse (the default), monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat and streamOptimized; the options `adapter_type`, `hwversion`,
//! `toolsversion`, `compat6`, `zeroed_grain` and `backing_file` (recorded as
//! `parentFileNameHint`, with the parent's CID as `parentCID`). Every byte is qemu's but the
//! random CID; files are written in qemu's order and sizes, so that they also take the same
//! host blocks.

use super::descriptor::NewDescriptor;
use super::header::{
    SparseHeader, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD,
    FLAG_ZERO_GRAIN, GTES_PER_GT,
};
use crate::block::BlockImage;
use crate::chain::ChainGuard;
use crate::error::{Error, Result, ResultExt};
use crate::info::FormatSpecific;
use crate::opener::Opener;
use crate::option_desc::{OptDesc, OptType, BACKING_FILE, FILE_PROTOCOL, SIZE};
use crate::storage::Storage;
use std::path::{Path, PathBuf};

/// Bytes of one extent of the twoGbMaxExtent subformats.
const SPLIT_SIZE: u64 = 0x8000_0000;

/// The options of `create -o`, as qemu's vmdk driver describes them.
pub const CREATE_OPTIONS: &[OptDesc] = &[
    OptDesc::new(
        "adapter_type",
        OptType::Str,
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    ),
    BACKING_FILE,
    OptDesc::new("backing_fmt", OptType::Str, "Must be 'vmdk' if present"),
    OptDesc::new("compat6", OptType::Bool, "VMDK version 6 image"),
    OptDesc::new("hwversion", OptType::Str, "VMDK hardware version"),
    SIZE,
    OptDesc::new(
        "subformat",
        OptType::Str,
        "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | \
         twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    ),
    OptDesc::new("toolsversion", OptType::Str, "VMware guest tools version"),
    OptDesc::new(
        "zeroed_grain",
        OptType::Bool,
        "Enable efficient zero writes using the zeroed-grain GTE feature",
    ),
];

/// The subformats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with the descriptor embedded.
    MonolithicSparse,
    /// A descriptor and one flat file.
    MonolithicFlat,
    /// A descriptor and sparse files of 2 GiB each.
    TwoGbMaxExtentSparse,
    /// A descriptor and flat files of 2 GiB each.
    TwoGbMaxExtentFlat,
    /// One compressed sparse file, written in order.
    StreamOptimized,
}

impl Subformat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }

    fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }

    fn split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentSparse | Subformat::TwoGbMaxExtentFlat
        )
    }

    /// Whether the disk is one file.
    pub fn one_file(self) -> bool {
        !self.flat() && !self.split()
    }
}

/// The `-o` options of a new disk, as given (checked by [`VmdkOptions::check`]).
#[derive(Debug, Clone, Default)]
pub struct VmdkOptions {
    /// `size`.
    pub size: Option<u64>,
    /// `adapter_type`.
    pub adapter_type: Option<String>,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_fmt: Option<String>,
    /// `compat6` as given, and its value.
    pub compat6: Option<(String, bool)>,
    /// `hwversion`.
    pub hwversion: Option<String>,
    /// `toolsversion`.
    pub toolsversion: Option<String>,
    /// `subformat`.
    pub subformat: Option<String>,
    /// `zeroed_grain` as given, and its value.
    pub zeroed_grain: Option<(String, bool)>,
}

/// Checked options.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The subformat.
    pub subformat: Subformat,
    /// `ddb.adapterType`.
    pub adapter: String,
    /// `ddb.virtualHWVersion`.
    pub hw: String,
    /// `ddb.toolsVersion`.
    pub tools: String,
    /// Zeroed-grain GTEs.
    pub zeroed: bool,
}

impl VmdkOptions {
    /// Parses `-o` arguments (later ones win), refusing unknown keys and bad booleans in
    /// qemu's words.
    pub fn parse(options: &[String]) -> Result<Self> {
        let mut o = VmdkOptions::default();
        for p in crate::option_desc::parse(options, &[CREATE_OPTIONS, FILE_PROTOCOL])? {
            let given = Some(p.given.clone());
            match p.name {
                "size" => o.size = Some(p.number()),
                "adapter_type" => o.adapter_type = given,
                "backing_file" => o.backing_file = given,
                "backing_fmt" => o.backing_fmt = given,
                "compat6" => o.compat6 = Some((p.given.clone(), p.flag())),
                "hwversion" => o.hwversion = given,
                "toolsversion" => o.toolsversion = given,
                "subformat" => o.subformat = given,
                "zeroed_grain" => o.zeroed_grain = Some((p.given.clone(), p.flag())),
                "preallocation" => crate::option_desc::preallocation_off("vmdk", &p.given)?,
                // The file's `nocow` and `extent_size_hint` change nothing here.
                _ => {}
            }
        }
        Ok(o)
    }

    /// The checks qemu makes when it writes the disk, in its order and words.
    pub fn check(&self) -> Result<Checked> {
        if self.backing_fmt.as_deref().is_some_and(|f| f != "vmdk") {
            return Err(Error::invalid_input("backing_file must be a vmdk image"));
        }
        let adapter = match self.adapter_type.as_deref() {
            None => "ide".to_string(),
            Some(a @ ("ide" | "buslogic" | "lsilogic" | "legacyESX")) => a.to_string(),
            Some(a) => {
                return Err(Error::invalid_input(format!(
                    "invalid parameter value: {a}"
                )))
            }
        };
        let subformat = match self.subformat.as_deref() {
            None => Subformat::MonolithicSparse,
            Some(s) => Subformat::parse(s)
                .ok_or_else(|| Error::invalid_input(format!("invalid parameter value: {s}")))?,
        };
        let hw = self.hwversion.clone().filter(|h| h != "undefined");
        let compat6 = self.compat6.as_ref().is_some_and(|c| c.1);
        let hw = match (compat6, hw) {
            (true, Some(_)) => {
                return Err(Error::invalid_input(
                    "compat6 cannot be enabled with hwversion set",
                ))
            }
            (true, None) => "6".to_string(),
            (false, h) => h.unwrap_or_else(|| "4".to_string()),
        };
        let zeroed = self.zeroed_grain.as_ref().is_some_and(|z| z.1);
        if subformat.flat() && self.backing_file.is_some() {
            return Err(Error::unsupported("Flat image can't have backing file"));
        }
        if subformat.flat() && zeroed {
            return Err(Error::unsupported("Flat image can't enable zeroed grain"));
        }
        Ok(Checked {
            subformat,
            adapter,
            hw,
            tools: self
                .toolsversion
                .clone()
                .unwrap_or_else(|| "2147483647".into()),
            zeroed,
        })
    }

    /// The subformat named, if it is one (the default otherwise).
    pub fn subformat(&self) -> Option<Subformat> {
        match self.subformat.as_deref() {
            None => Some(Subformat::MonolithicSparse),
            Some(s) => Subformat::parse(s),
        }
    }
}

/// The checked `create -f vmdk` request.
pub fn prepare(
    command: &crate::creation::CreateCommand<'_>,
) -> Result<Box<dyn crate::creation::FormatCreation>> {
    let path = command.path;
    let mut opts = VmdkOptions::parse(command.options).in_file(path)?;
    if let Some(b) = command.backing_file {
        opts.backing_file = Some(b.to_string());
    }
    if let Some(f) = command.backing_format {
        opts.backing_fmt = Some(f.to_string());
    }
    let positional = command
        .size
        .map(crate::size::parse_size)
        .transpose()
        .in_file(path)?;
    opts.size = positional.or(opts.size);
    if let (Some(name), Some(open)) = (&opts.backing_file, command.open_backing) {
        let bpath = command.opener.resolve(path, name)?;
        let bsize = open(&crate::creation::BackingToOpen {
            image: path,
            backing: &bpath,
            format: opts.backing_fmt.as_deref(),
            data_file: None,
        })?;
        opts.size = opts.size.or(Some(bsize));
    }
    if opts.size.is_none() {
        return Err(Error::invalid_input("Image creation needs a size parameter").with_path(path));
    }
    Ok(Box::new(VmdkCreation {
        path: path.to_path_buf(),
        opts,
        opener: command.opener.clone(),
    }))
}

/// A `create -f vmdk` request, ready to write.
#[derive(Debug)]
pub struct VmdkCreation {
    path: PathBuf,
    opts: VmdkOptions,
    opener: Opener,
}

impl crate::creation::FormatCreation for VmdkCreation {
    /// `Formatting 'x.vmdk', fmt=vmdk size=N ...`, the options in qemu's order, as given.
    fn formatting_line(&self) -> String {
        let o = &self.opts;
        let mut s = format!(
            "Formatting '{}', fmt=vmdk size={}",
            self.path.display(),
            o.size.unwrap_or(0)
        );
        let mut add = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                // qemu prints a comma in a value doubled, as its option syntax escapes it.
                s.push_str(&format!(" {k}={}", v.replace(',', ",,")));
            }
        };
        add("adapter_type", o.adapter_type.as_deref());
        add("backing_file", o.backing_file.as_deref());
        add("backing_fmt", o.backing_fmt.as_deref());
        add(
            "compat6",
            Some(o.compat6.as_ref().map_or("off", |c| c.0.as_str())),
        );
        add(
            "hwversion",
            Some(o.hwversion.as_deref().unwrap_or("undefined")),
        );
        add("toolsversion", o.toolsversion.as_deref());
        add("subformat", o.subformat.as_deref());
        add(
            "zeroed_grain",
            o.zeroed_grain.as_ref().map(|z| z.0.as_str()),
        );
        s
    }

    fn execute(&self) -> Result<()> {
        create_files(&self.opener, &self.path, &self.opts).map(|_| ())
    }
}

/// The parts of a path as qemu's `filename_decompose` cuts it: folder (with its slash),
/// name before the last dot, and the rest.
fn decompose(path: &Path) -> (String, String, String) {
    let s = path.display().to_string();
    let (dir, base) = match s.rfind('/') {
        Some(i) => (s[..=i].to_string(), s[i + 1..].to_string()),
        None => (String::new(), s.clone()),
    };
    match base.rfind('.') {
        Some(i) => (dir, base[..i].to_string(), base[i..].to_string()),
        None => (dir, base, String::new()),
    }
}

/// Writes a hosted sparse extent of `size` bytes into the empty `storage` (qemu's
/// `vmdk_init_extent`), or truncates a flat one to `size`.
fn init_extent(
    storage: &dyn Storage,
    size: u64,
    flat: bool,
    compress: bool,
    zeroed: bool,
) -> std::io::Result<()> {
    if flat {
        storage.set_len(size)?;
        return crate::raw::allocate_first_block(storage, size);
    }
    let capacity = size / 512;
    let granularity = 128u64;
    let grains = capacity.div_ceil(granularity);
    let gt_size = (GTES_PER_GT as u64 * 4).div_ceil(512);
    let gt_count = grains.div_ceil(GTES_PER_GT as u64);
    let gd_sectors = (gt_count * 4).div_ceil(512);
    let rgd_offset = 1 + 20;
    let gd_offset = rgd_offset + gd_sectors + gt_size * gt_count;
    let grain_offset = (gd_offset + gd_sectors + gt_size * gt_count).next_multiple_of(granularity);
    let h = SparseHeader {
        version: if compress {
            3
        } else if zeroed {
            2
        } else {
            1
        },
        flags: FLAG_RGD
            | FLAG_NL_DETECT
            | if compress {
                FLAG_COMPRESS | FLAG_MARKER
            } else {
                0
            }
            | if zeroed { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        granularity,
        desc_offset: 1,
        desc_size: 20,
        num_gtes_per_gt: GTES_PER_GT,
        rgd_offset,
        gd_offset,
        grain_offset,
        check_bytes: [0xa, 0x20, 0xd, 0xa],
        compress_algorithm: if compress { COMPRESSION_DEFLATE } else { 0 },
    };
    let b = h.to_bytes();
    // qemu writes the magic and its 75-byte header; the rest of the sector stays zero.
    storage.write_at(&b[..79], 0)?;
    storage.set_len(grain_offset * 512)?;
    let dir = |first: u64| -> Vec<u8> {
        let mut d = vec![0u8; (gd_sectors * 512) as usize];
        for i in 0..gt_count {
            let v = (first + gd_sectors + i * gt_size) as u32;
            d[(i * 4) as usize..(i * 4 + 4) as usize].copy_from_slice(&v.to_le_bytes());
        }
        d
    };
    if gd_sectors > 0 {
        storage.write_at(&dir(rgd_offset), rgd_offset * 512)?;
        storage.write_at(&dir(gd_offset), gd_offset * 512)?;
    }
    Ok(())
}

/// Reads the CID of the vmdk `name` names (relative to `image`), as qemu does before
/// recording it as `parentCID`.
fn parent_cid(opener: &Opener, image: &Path, name: &str) -> Result<u32> {
    let bpath = opener.resolve(image, name)?;
    let img = crate::open::open_image(
        &bpath,
        &crate::open::OpenOptions {
            no_backing: true,
            opener: opener.clone(),
            ..Default::default()
        },
    )
    .map_err(|e| e.with_path(image))?;
    match img.layer_info()?.format_specific {
        Some(FormatSpecific::Vmdk(i)) => Ok(i.cid),
        _ => Err(Error::invalid_input(format!(
            "Invalid backing file format: {}. Must be vmdk",
            img.format()
        ))
        .with_path(image)),
    }
}

fn random_cid() -> u32 {
    let mut r = [0u8; 4];
    if getrandom::fill(&mut r).is_err() {
        r = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1)
            .to_le_bytes();
    }
    u32::from_le_bytes(r)
}

/// Creates the files of the disk `opts` describe at `path` (qemu's `vmdk_co_do_create`);
/// a failed create removes every file it made.
pub fn create_files(opener: &Opener, path: &Path, opts: &VmdkOptions) -> Result<()> {
    let c = opts.check().in_file(path)?;
    let size = opts.size.unwrap_or(0).next_multiple_of(512);
    let mut made: Vec<PathBuf> = Vec::new();
    let res = write_files(opener, path, opts, &c, size, &mut made);
    if res.is_err() {
        for p in made.iter().rev() {
            opener.remove_failed_output(p);
        }
    }
    res
}

fn write_files(
    opener: &Opener,
    path: &Path,
    opts: &VmdkOptions,
    c: &Checked,
    size: u64,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let sf = c.subformat;
    let (dir, prefix, postfix) = decompose(path);
    let create = |p: &Path, made: &mut Vec<PathBuf>| -> Result<Box<dyn Storage>> {
        let s = opener
            .create(p)
            .map_err(|e| Error::io("cannot create image", e).with_path(p))?;
        made.push(p.to_path_buf());
        Ok(s)
    };
    fn io(p: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |e| Error::io("cannot write the new image", e).with_path(p)
    }
    let main = create(path, made)?;
    let mut lines = String::new();
    let line = |sectors: u64, file: &str| match sf.flat() {
        true => format!("RW {sectors} FLAT \"{file}\" 0\n"),
        false => format!("RW {sectors} SPARSE \"{file}\"\n"),
    };
    if sf.one_file() {
        init_extent(
            main.as_ref(),
            size,
            false,
            sf == Subformat::StreamOptimized,
            c.zeroed,
        )
        .map_err(io(path))?;
        let base = format!("{prefix}{postfix}");
        lines.push_str(&line(size / 512, &base));
    }
    let parent = match &opts.backing_file {
        Some(name) => Some((name.as_str(), parent_cid(opener, path, name)?)),
        None => None,
    };
    if !sf.one_file() {
        let extent_size = if sf.split() { SPLIT_SIZE } else { size };
        let mut created = 0u64;
        let mut idx = 1;
        while created < size {
            let cur = (size - created).min(extent_size);
            let name = if sf.split() {
                format!(
                    "{prefix}-{}{idx:03}{postfix}",
                    if sf.flat() { 'f' } else { 's' }
                )
            } else {
                format!("{prefix}-flat{postfix}")
            };
            let p = PathBuf::from(format!("{dir}{name}"));
            let st = create(&p, made)?;
            init_extent(st.as_ref(), cur, sf.flat(), false, c.zeroed).map_err(io(&p))?;
            st.flush().map_err(io(&p))?;
            lines.push_str(&line(cur / 512, &name));
            created += cur;
            idx += 1;
        }
    }
    let desc = NewDescriptor {
        cid: random_cid(),
        parent_cid: parent.map_or(0xffff_ffff, |p| p.1),
        create_type: sf.name(),
        parent_hint: parent.map(|p| p.0),
        extents: &lines,
        hw_version: &c.hw,
        size,
        adapter_type: &c.adapter,
        tools_version: &c.tools,
    }
    .render();
    if sf.one_file() {
        main.write_at(desc.as_bytes(), 0x200).map_err(io(path))?;
    } else {
        main.write_at(desc.as_bytes(), 0).map_err(io(path))?;
        main.set_len(desc.len() as u64).map_err(io(path))?;
    }
    main.flush().map_err(io(path))
}

/// `convert`'s new vmdk: created as `create` makes it with `options`, the given backing file
/// recorded, then opened for writing.
pub fn create_target(
    path: &Path,
    size: u64,
    options: &[String],
    backing: (Option<String>, Option<String>),
    no_backing: bool,
    opener: &Opener,
) -> Result<Box<dyn BlockImage>> {
    let mut opts = VmdkOptions::parse(options).in_file(path)?;
    opts.size = Some(size);
    if let Some(b) = backing.0 {
        opts.backing_file = Some(b);
    }
    if let Some(f) = backing.1 {
        opts.backing_fmt = Some(f);
    }
    create_files(opener, path, &opts)?;
    let mut guard = ChainGuard::with_opener(crate::chain::Sharing::default(), opener.clone());
    guard.enter(path)?;
    Ok(Box::new(super::VmdkImage::open(
        path, true, no_backing, &mut guard,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cut_as_qemu_cuts_them() {
        assert_eq!(
            decompose(Path::new("/a/b.c/d.vmdk")),
            ("/a/b.c/".into(), "d".into(), ".vmdk".into())
        );
        assert_eq!(
            decompose(Path::new("disk")),
            ("".into(), "disk".into(), "".into())
        );
    }

    #[test]
    fn option_conflicts_are_refused_in_qemus_words() {
        let chk = |o: &str| VmdkOptions::parse(&[o.to_string()]).unwrap().check();
        assert_eq!(
            chk("compat6=on,hwversion=7").unwrap_err().what(),
            "compat6 cannot be enabled with hwversion set"
        );
        assert_eq!(
            chk("adapter_type=pvscsi").unwrap_err().what(),
            "invalid parameter value: pvscsi"
        );
        assert_eq!(
            chk("subformat=monolithicFlat,zeroed_grain=on")
                .unwrap_err()
                .what(),
            "Flat image can't enable zeroed grain"
        );
        assert_eq!(chk("compat6=on").unwrap().hw, "6");
        assert!(VmdkOptions::parse(&["zeroed_grain=maybe".into()]).is_err());
    }
}
