//! The corruption corpus (test-images/corrupt/) under memory and time bounds.
//!
//! A binary of its own rather than a module of `hostile`: the peak memory of each vimg process
//! is read from `wait4`'s `ru_maxrss`, which keeps the high-water mark of the forked copy of
//! this test process across `exec`. Sharing a binary with tests that hold a lot of memory
//! in-process (the fuzz replays) would charge their pages to every vimg run.

#[path = "../common/mod.rs"]
mod common;

mod corruption_corpus;
