//! `create -f qcow2`: a checked request ([`Qcow2Creation`]), its "Formatting" line, and the
//! write, by [`super::create`].

use super::options::{CreateOptions, OptionUpdates};
use crate::error::Result;
use crate::ops::create::{CreateRequest, FormatCreation};
use crate::qcow2::format::header::CompressionType;
use std::path::PathBuf;

/// A checked `create -f qcow2` request.
#[derive(Debug, Clone)]
pub(crate) struct Qcow2Creation {
    /// The file to create.
    path: PathBuf,
    /// The complete options.
    options: Box<CreateOptions>,
    /// The `-o` options as given (the formatting line shows some only when given).
    given: Box<OptionUpdates>,
}

impl Qcow2Creation {
    /// The checks qemu-img makes before it prints its "Formatting" line, in its order and
    /// words (`bdrv_img_create`: the backing file, then the size); the format's own checks
    /// ([`CreateOptions::validate`]) follow when the image is written, after that line, as in
    /// qemu-img.
    pub(crate) fn prepare(request: &CreateRequest<'_>) -> Result<Self> {
        let mut options = CreateOptions::default();
        options.apply(request.given);
        options.size = request.check_backing()?;
        Ok(Qcow2Creation {
            path: request.path.to_path_buf(),
            options: Box::new(options),
            given: Box::new(request.given.clone()),
        })
    }
}

impl FormatCreation for Qcow2Creation {
    /// E.g. `Formatting 'disk.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off
    /// compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16`: the main
    /// options in qemu-img's order, with `preallocation`, `compat` and `data_file_raw` only
    /// when given. Values are shown normalised (`compat=1.1` for `v3`, `on`/`off` for
    /// booleans).
    fn formatting_line(&self) -> String {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let (o, given) = (&self.options, &self.given);
        let mut s = format!(
            "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}",
            self.path.display(),
            o.cluster_size,
            onoff(o.extended_l2)
        );
        if given.preallocation.is_some() {
            s.push_str(&format!(" preallocation={}", o.preallocation.as_str()));
        }
        let ct = match o.compression_type {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        };
        s.push_str(&format!(" compression_type={ct} size={}", o.size));
        if given.compat.is_some() {
            s.push_str(&format!(" compat={}", o.compat.as_str()));
        }
        if let Some(b) = &o.backing_file {
            // qemu prints option values with their commas doubled.
            s.push_str(&format!(" backing_file={}", b.replace(',', ",,")));
        }
        if let Some(f) = &o.backing_fmt {
            s.push_str(&format!(" backing_fmt={f}"));
        }
        if let Some(d) = &o.data_file {
            s.push_str(&format!(" data_file={d}"));
        }
        if given.data_file_raw.is_some() {
            s.push_str(&format!(" data_file_raw={}", onoff(o.data_file_raw)));
        }
        s.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            onoff(o.lazy_refcounts),
            // Signed, as qemu prints it (a negative width given wrapped around).
            o.refcount_bits as i64
        ));
        s
    }

    fn execute(&self) -> Result<()> {
        super::create(&self.path, &self.options).map_err(|e| e.with_path(&self.path))
    }
}
