//! Commands built on [`crate::block::BlockImage`]: info, map, compare, check, convert.
