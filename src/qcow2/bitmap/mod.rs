//! Persistent dirty bitmaps (qemu docs/interop/qcow2.rst "Bitmaps extension", "Bitmap
//! directory", "Bitmap table", "Bitmap data").
//!
//! - [`directory`]: reading the bitmap directory and bitmap tables;
//! - [`mod@write`]: writing them, with a crash-safe directory commit;
//! - [`track`]: marking guest writes in the bitmaps being tracked (the tracker's state);
//! - [`edit`]: adding, removing, clearing, enabling, disabling and merging bitmaps.

pub(super) mod directory;
pub(super) mod edit;
pub(super) mod track;
pub(in crate::qcow2) mod tracker;
pub(super) mod write;
