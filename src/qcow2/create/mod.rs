//! Creating qcow2 images (`qemu-img create -f qcow2`), laid out the way qemu-img 10 lays out a
//! new image (qemu docs/interop/qcow2.rst "Header", "Header extensions", "Host cluster
//! management", "Cluster mapping"), so that `qemu-img info`, `qemu-img check` and `qemu-img
//! map` see the same image whichever tool made it:
//!
//! - [`options`]: the options, qemu's `-o` lists, and the combinations qemu refuses;
//! - [`plan`]: where every cluster goes, replaying qemu's allocation order in memory;
//! - [`writer`]: writing the planned image;
//! - [`request`]: `create -f qcow2` through the format driver (the checked request and its
//!   "Formatting" line);
//! - [`mod@measure`]: `measure -O qcow2`, qemu-img's arithmetic for a new image.

mod measure;
mod options;
mod plan;
mod request;
mod writer;

pub(crate) use measure::measure;
pub use options::{parse_options, Compat, CreateOptions, EncryptOptions, OptionUpdates, WEAK_AES};
pub(crate) use options::{
    round_size, BACKING_FMT, COMPAT, CREATE_OPTIONS, DATA_FILE, DATA_FILE_RAW, ENCRYPT_ITER_TIME,
    LAZY_REFCOUNTS, REFCOUNT_BITS,
};
pub use request::CreateRequest;
pub(crate) use request::{parse_target_options, Qcow2Creation};
pub(crate) use writer::create_file;
pub use writer::{create, create_with};

/// [`CreateOptions::default`] changed by `f`, for the tests of this folder.
#[cfg(test)]
fn opts(f: impl FnOnce(&mut CreateOptions)) -> CreateOptions {
    let mut o = CreateOptions::default();
    f(&mut o);
    o
}
