//! qemu's `blkdebug` fault-injection driver: a [`Storage`] wrapped so that its reads and writes
//! fail, by rule, with a chosen `errno`.
//!
//! Written here because no crate does it: it has to follow qemu's configuration syntax and
//! rule semantics (which qemu's iotests and users' scripts rely on) and sit under vimg's own
//! format drivers, which tell it what they are doing through [`Storage::debug_event`].
//!
//! # Reaching it
//!
//! Image names spell it as qemu does ([`crate::image_spec`] hands them here):
//! `blkdebug:CONFIG:IMAGE` (`blkdebug::IMAGE` without a configuration file),
//! `json:{"driver":"blkdebug","inject-error":[...],"image":{...}}` (also as the `file` of a
//! format driver, and as a backing file name recorded in an image), and with `--image-opts`
//! `driver=blkdebug,image.driver=qcow2,image.file.filename=...,inject-error.0.event=...`.
//! The rules of a parsed name are given to the command's [`crate::opener::Opener`] for the file
//! it names; every later open of that file through the opener ([`wrap_with`]) gets a fresh
//! instance of them, as each open of a blkdebug node in qemu does.
//!
//! # The subset of qemu's blkdebug supported
//!
//! * `[inject-error]` with `event`, `errno` (default `EIO`; 0 injects nothing), `once`,
//!   `sector` (a 512-byte sector the request must cover; any request without it), `state`
//!   and `immediately` (accepted: vimg's I/O is synchronous, so an error comes at once
//!   either way), and `iotype` (one of `read`, `write`, `write-zeroes`, `discard`, `flush`,
//!   `block-status`; without it, all but `block-status`, as in qemu).
//! * `[set-state]` with `event`, `state`, `new_state`.
//! * As in qemu, rules of an event become the active ones when the event fires (if their
//!   `state` is 0 or the current state; the state starts at 1); every read, write, zeroing,
//!   discard and flush then fails with the first active rule covering it (flushes only with
//!   rules without `sector`); a `once` rule is dropped after firing.
//! * Only the events `read_aio` and `write_aio` fire: vimg's qcow2 and raw drivers emit them
//!   before reading and writing guest data. All of qemu's other event names are accepted and
//!   never fire (vimg does not emit them), so their rules never inject anything.
//! * `align`, `max-transfer`, `opt-write-zero`, `max-write-zero`, `opt-discard`,
//!   `max-discard` are checked and accepted; they change nothing (vimg splits requests as it
//!   likes).
//! * blkdebug over a format driver (`driver=blkdebug,image.driver=qcow2`) opens the image as
//!   it is: qemu's format drivers send their events to their own file, not to a blkdebug node
//!   above them, so such rules never fire in qemu either.
//! * Messages name the image file, where qemu names a `blkdebug:` node by its whole name
//!   (map's File column, for one); compare's read failure names the image as given.
//! * Rules belong to the file, not to one name of it: within one command, every open of a
//!   file named once through blkdebug gets its rules (`compare blkdebug:C:x.qcow2 x.qcow2`
//!   fails on both sides, where qemu fails on the first only).
//! * Not supported: `suspend`/breakpoints, `take-child-perms`/`unshare-child-perms` other
//!   than being accepted, and qemu's permission games.

use crate::error::{Error, Result};
use crate::storage::Storage;
use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub use crate::storage::DebugEvent as Event;

/// Every event name qemu's blkdebug knows (rules naming others are refused, as in qemu).
const EVENT_NAMES: &[&str] = &[
    "l1_update",
    "l1_grow_alloc_table",
    "l1_grow_write_table",
    "l1_grow_activate_table",
    "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters",
    "l2_load",
    "l2_update",
    "l2_update_compressed",
    "l2_alloc_cow_read",
    "l2_alloc_write",
    "read_aio",
    "read_backing_aio",
    "read_compressed",
    "write_aio",
    "write_compressed",
    "vmstate_load",
    "vmstate_save",
    "cow_read",
    "cow_write",
    "reftable_load",
    "reftable_grow",
    "reftable_update",
    "refblock_load",
    "refblock_update",
    "refblock_update_part",
    "refblock_alloc",
    "refblock_alloc_hookup",
    "refblock_alloc_write",
    "refblock_alloc_write_blocks",
    "refblock_alloc_write_table",
    "refblock_alloc_switch_table",
    "cluster_alloc",
    "cluster_alloc_bytes",
    "cluster_free",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_after_head",
    "pwritev_rmw_tail",
    "pwritev_rmw_after_tail",
    "pwritev",
    "pwritev_zero",
    "pwritev_done",
    "empty_image_prepare",
    "cor_write",
    "cluster_alloc_space",
];

/// Options of the blkdebug node itself that are checked and change nothing for vimg.
const LIMIT_OPTIONS: &[&str] = &[
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
];

/// Options of the blkdebug node accepted and ignored.
const IGNORED_OPTIONS: &[&str] = &[
    "node-name",
    "take-child-perms",
    "unshare-child-perms",
    "read-only",
    "auto-read-only",
    "discard",
    "cache.direct",
    "cache.no-flush",
    "detect-zeroes",
];

/// One `[inject-error]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InjectRule {
    event: String,
    state: u64,
    errno: i32,
    once: bool,
    /// The kinds of request it fails, a mask of [`IoType`] bits.
    iotypes: u8,
    /// The 512-byte sector a request must cover; any request when `None`.
    sector: Option<u64>,
}

/// One `[set-state]` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SetStateRule {
    event: String,
    state: u64,
    new_state: u64,
}

/// The rules of a blkdebug node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    inject: Vec<InjectRule>,
    set_state: Vec<SetStateRule>,
    /// `align`: the request alignment asked for (checked, otherwise unused).
    pub align: Option<u64>,
}

impl Config {
    /// Whether the configuration has no rules at all.
    pub fn is_empty(&self) -> bool {
        self.inject.is_empty() && self.set_state.is_empty()
    }

    /// Reads a configuration file in qemu's format: `[inject-error]` and `[set-state]` groups
    /// of `key = "value"` lines; `#` starts a comment line.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("Could not read blkdebug config file", e).bare())?;
        let mut config = Config::default();
        config.add_ini(&text).map_err(Error::invalid_input)?;
        Ok(config)
    }

    /// Adds the groups of a configuration file's text.
    fn add_ini(&mut self, text: &str) -> std::result::Result<(), String> {
        let mut group: Option<(String, BTreeMap<String, String>)> = None;
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if let Some((g, opts)) = group.take() {
                    self.add_group(&g, &opts)?;
                }
                // `[group "id"]`: the id does not matter here.
                let name = name.split_whitespace().next().unwrap_or_default();
                group = Some((name.to_string(), BTreeMap::new()));
                continue;
            }
            // qemu's words, without the line (its message has none either).
            let Some((_, opts)) = group.as_mut() else {
                return Err("no group defined".to_string());
            };
            let parsed = line.split_once('=').and_then(|(k, v)| {
                let v = v.trim();
                let v = v.strip_prefix('"')?.strip_suffix('"')?;
                Some((k.trim().to_string(), v.to_string()))
            });
            let Some((k, v)) = parsed else {
                return Err("parse error".to_string());
            };
            opts.insert(k, v);
        }
        if let Some((g, opts)) = group.take() {
            self.add_group(&g, &opts)?;
        }
        Ok(())
    }

    /// Adds one `[inject-error]` or `[set-state]` group.
    fn add_group(
        &mut self,
        group: &str,
        opts: &BTreeMap<String, String>,
    ) -> std::result::Result<(), String> {
        let allowed: &[&str] = match group {
            "inject-error" => &[
                "event",
                "state",
                "errno",
                "sector",
                "once",
                "immediately",
                "iotype",
            ],
            "set-state" => &["event", "state", "new_state"],
            _ => return Err(format!("There is no option group '{group}'")),
        };
        if let Some(k) = opts.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        let event = opts
            .get("event")
            .ok_or_else(|| "Missing event name for rule".to_string())?;
        if !EVENT_NAMES.contains(&event.as_str()) {
            return Err(format!("invalid parameter value: {event}"));
        }
        let number = |k: &str, default: u64| -> std::result::Result<u64, String> {
            match opts.get(k) {
                None => Ok(default),
                Some(v) => {
                    parse_number(v).ok_or_else(|| format!("Parameter '{k}' expects a number"))
                }
            }
        };
        let flag = |k: &str| -> std::result::Result<bool, String> {
            match opts.get(k) {
                None => Ok(false),
                Some(v) => crate::option_list::boolean(k, v).map_err(|e| e.what().to_string()),
            }
        };
        let state = number("state", 0)?;
        if group == "inject-error" {
            let errno = number("errno", libc::EIO as u64)?;
            let errno = i32::try_from(errno).map_err(|_| "Parameter 'errno' is too large")?;
            flag("immediately")?;
            // One kind per rule, as in qemu.
            let iotypes = match opts.get("iotype") {
                None => IoType::DEFAULT,
                Some(t) => {
                    IoType::from_name(t).ok_or_else(|| format!("invalid parameter value: {t}"))?
                }
            };
            self.inject.push(InjectRule {
                event: event.clone(),
                state,
                errno,
                once: flag("once")?,
                iotypes,
                sector: opts
                    .get("sector")
                    .map(|_| number("sector", 0))
                    .transpose()?,
            });
        } else {
            self.set_state.push(SetStateRule {
                event: event.clone(),
                state,
                new_state: number("new_state", 0)?,
            });
        }
        Ok(())
    }

    /// Adds the rules given as options (`inject-error.N.KEY`, `set-state.N.KEY`, in the order
    /// of `N`), and checks the node's other options; `key` prefixes messages.
    pub(crate) fn add_options(&mut self, opts: &BTreeMap<String, String>) -> Result<()> {
        let mut lists: BTreeMap<(String, u64), BTreeMap<String, String>> = BTreeMap::new();
        for (k, v) in opts {
            let mut parts = k.splitn(3, '.');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(g @ ("inject-error" | "set-state")), Some(i), Some(key)) => {
                    let i = i
                        .parse::<u64>()
                        .map_err(|_| Error::invalid_input(format!("Invalid parameter '{k}'")))?;
                    lists
                        .entry((g.to_string(), i))
                        .or_default()
                        .insert(key.to_string(), v.clone());
                }
                (Some("align"), None, None) => {
                    let a =
                        parse_number(v).filter(|a| *a > 0 && a.is_power_of_two() && *a < 1 << 31);
                    if a.is_none() {
                        return Err(Error::invalid_input(
                            "Invalid alignment, align must be integer power of 2",
                        ));
                    }
                    self.align = a;
                }
                (Some(o), None, None) if LIMIT_OPTIONS.contains(&o) => {
                    if parse_number(v).is_none() {
                        return Err(Error::invalid_input(format!(
                            "Parameter '{o}' expects a non-negative number below 2^64"
                        )));
                    }
                }
                (Some(o), _, _) if IGNORED_OPTIONS.contains(&k.as_str()) || o == "driver" => {}
                _ => {
                    return Err(Error::invalid_input(format!(
                        "Block protocol 'blkdebug' doesn't support the option '{k}'"
                    )))
                }
            }
        }
        // Groups in the order of their index, inject-error ones before set-state ones.
        for ((g, _), group) in &lists {
            self.add_group(g, group).map_err(Error::invalid_input)?;
        }
        Ok(())
    }
}

/// A number as qemu's option parser takes it: decimal, or `0x` hexadecimal; a size may have a
/// `k`/`M`/`G`/`T` suffix.
fn parse_number(v: &str) -> Option<u64> {
    let v = v.trim();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if "kKmMgGtT".contains(c) => (
            &v[..i],
            match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                _ => 40,
            },
        ),
        _ => (v, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
}

/// `storage` wrapped in a [`BlkdebugStorage`] with fresh state, injecting errors by `config`'s
/// rules (the [`crate::opener::Opener`] calls this for the files rules were given for).
pub fn wrap_with(config: Arc<Config>, storage: Box<dyn Storage>) -> Box<dyn Storage> {
    Box::new(BlkdebugStorage::new(storage, config))
}

/// The changing part of a blkdebug node: its state number and active rules.
#[derive(Debug)]
struct RuleState {
    state: u64,
    /// Indices into the configuration's inject rules, most recently activated first.
    active: Vec<usize>,
    /// Rules dropped after firing once.
    dropped: Vec<bool>,
}

/// A storage whose I/O fails by the rules of a [`Config`] (see the module documentation).
pub struct BlkdebugStorage {
    inner: Box<dyn Storage>,
    config: Arc<Config>,
    state: Arc<Mutex<RuleState>>,
}

impl std::fmt::Debug for BlkdebugStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkdebugStorage")
            .field("path", &self.inner.path())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The kinds of request a rule can fail (qemu's `BlkdebugIOType`), as mask bits.
struct IoType;

impl IoType {
    const READ: u8 = 1;
    const WRITE: u8 = 2;
    const WRITE_ZEROES: u8 = 4;
    const DISCARD: u8 = 8;
    const FLUSH: u8 = 16;
    const BLOCK_STATUS: u8 = 32;
    /// What a rule without `iotype` fails: everything but block-status queries.
    const DEFAULT: u8 = Self::READ | Self::WRITE | Self::WRITE_ZEROES | Self::DISCARD | Self::FLUSH;

    fn from_name(name: &str) -> Option<u8> {
        Some(match name {
            "read" => Self::READ,
            "write" => Self::WRITE,
            "write-zeroes" => Self::WRITE_ZEROES,
            "discard" => Self::DISCARD,
            "flush" => Self::FLUSH,
            "block-status" => Self::BLOCK_STATUS,
            _ => return None,
        })
    }
}

/// A request to check against the rules: its [`IoType`] bit and its byte range (flushes
/// have none, and only fail by rules without `sector`).
#[derive(Clone, Copy)]
enum Request {
    Range(u8, u64, u64),
    Flush,
}

impl BlkdebugStorage {
    /// `inner` failing by the rules of `config`, in their initial state.
    pub fn new(inner: Box<dyn Storage>, config: Arc<Config>) -> Self {
        let n = config.inject.len();
        BlkdebugStorage {
            inner,
            config,
            state: Arc::new(Mutex::new(RuleState {
                state: 1,
                active: Vec::new(),
                dropped: vec![false; n],
            })),
        }
    }

    /// The error to inject into `req`, if an active rule covers it.
    fn check(&self, req: Request) -> io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let hit = st.active.iter().position(|&i| {
            let r = &self.config.inject[i];
            let kind = match req {
                Request::Range(k, _, _) => k,
                Request::Flush => IoType::FLUSH,
            };
            if r.iotypes & kind == 0 {
                return false;
            }
            match (r.sector, req) {
                (None, _) => true,
                (Some(s), Request::Range(_, off, len)) => {
                    let b = s.saturating_mul(512);
                    b >= off && b < off.saturating_add(len.max(1))
                }
                (Some(_), Request::Flush) => false,
            }
        });
        let Some(pos) = hit else {
            return Ok(());
        };
        let i = st.active[pos];
        let rule = &self.config.inject[i];
        if rule.errno == 0 {
            return Ok(());
        }
        if rule.once {
            st.active.remove(pos);
            st.dropped[i] = true;
        }
        Err(io::Error::from_raw_os_error(rule.errno))
    }
}

impl Storage for BlkdebugStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(Request::Range(IoType::READ, offset, buf.len() as u64))?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(Request::Range(IoType::WRITE, offset, buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn stored_len(&self) -> io::Result<u64> {
        self.inner.stored_len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> io::Result<()> {
        self.check(Request::Flush)?;
        self.inner.flush()
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(Request::Range(IoType::WRITE_ZEROES, offset, len))?;
        self.inner.zero_range(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.check(Request::Range(IoType::DISCARD, offset, len))?;
        self.inner.punch_hole(offset, len)
    }
    fn extent_at(&self, offset: u64) -> io::Result<(bool, u64)> {
        self.check(Request::Range(IoType::BLOCK_STATUS, offset, 1))?;
        self.inner.extent_at(offset)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    /// The file, for what only a file can do (preallocation), which qemu's blkdebug passes on
    /// too.
    fn host_file(&self) -> Option<&std::fs::File> {
        self.inner.host_file()
    }
    fn duplicate(&self) -> Option<Box<dyn Storage>> {
        Some(Box::new(BlkdebugStorage {
            inner: self.inner.duplicate()?,
            config: self.config.clone(),
            state: self.state.clone(),
        }))
    }
    fn debug_event(&self, event: Event) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let current = st.state;
        let applies = |event_name: &str, state: u64| {
            event_name == event.name() && (state == 0 || state == current)
        };
        let mut new_state = current;
        for r in self.config.set_state.iter().rev() {
            if applies(&r.event, r.state) {
                new_state = r.new_state;
            }
        }
        let fired: Vec<usize> = (0..self.config.inject.len())
            .rev()
            .filter(|&i| !st.dropped[i])
            .filter(|&i| applies(&self.config.inject[i].event, self.config.inject[i].state))
            .collect();
        if !fired.is_empty() {
            // The event's rules replace the active ones; the first given is tried first.
            st.active = fired.into_iter().rev().collect();
        }
        st.state = new_state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_spec::{unwrap_json, unwrap_opts};

    #[test]
    fn config_file_syntax() {
        let mut c = Config::default();
        c.add_ini(
            "# comment\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n\n\
             [set-state]\nevent = \"write_aio\"\nnew_state = \"2\"\n",
        )
        .unwrap();
        assert_eq!(c.inject.len(), 1);
        assert_eq!(c.inject[0].errno, 5);
        assert!(!c.inject[0].once);
        assert_eq!(c.set_state[0].new_state, 2);
        for bad in [
            "[inject-error]\nevent = read_aio\n",
            "event = \"read_aio\"\n",
            "[bogus]\nevent = \"read_aio\"\n",
            "[inject-error]\nevent = \"no_such_event\"\n",
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"x\"\n",
            "[inject-error]\nerrno = \"5\"\n",
        ] {
            assert!(Config::default().add_ini(bad).is_err(), "{bad}");
        }
    }

    fn memory() -> Box<dyn Storage> {
        Box::new(crate::storage::MemStorage::new(vec![0u8; 8192]))
    }

    #[test]
    fn rules_fire_after_their_event_only() {
        let mut c = Config::default();
        c.add_ini(
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\nsector = \"2\"\nonce = \"on\"\n",
        )
        .unwrap();
        let s = BlkdebugStorage::new(memory(), Arc::new(c));
        let mut b = [0u8; 512];
        s.read_at(&mut b, 1024).unwrap();
        s.debug_event(Event::WriteAio);
        s.read_at(&mut b, 1024).unwrap();
        s.debug_event(Event::ReadAio);
        s.read_at(&mut b, 0).unwrap();
        let e = s.read_at(&mut b, 1024).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        // once: gone, even after the event again.
        s.read_at(&mut b, 1024).unwrap();
        s.debug_event(Event::ReadAio);
        s.read_at(&mut b, 1024).unwrap();
    }

    #[test]
    fn iotype_limits_the_requests_a_rule_fails() {
        let mut c = Config::default();
        c.add_ini("[inject-error]\nevent = \"write_aio\"\niotype = \"write\"\n")
            .unwrap();
        let s = BlkdebugStorage::new(memory(), Arc::new(c));
        s.debug_event(Event::WriteAio);
        let mut b = [0u8; 16];
        s.read_at(&mut b, 0).unwrap();
        s.zero_range(0, 16).unwrap();
        s.flush().unwrap();
        assert!(s.write_at(&b, 0).is_err());
        assert!(Config::default()
            .add_ini("[inject-error]\nevent = \"write_aio\"\niotype = \"read,write\"\n")
            .is_err());
    }

    #[test]
    fn states_gate_rules() {
        let mut c = Config::default();
        c.add_ini(
            "[set-state]\nevent = \"write_aio\"\nstate = \"1\"\nnew_state = \"2\"\n\
             [inject-error]\nevent = \"read_aio\"\nstate = \"2\"\n",
        )
        .unwrap();
        let s = BlkdebugStorage::new(memory(), Arc::new(c));
        let mut b = [0u8; 16];
        s.debug_event(Event::ReadAio);
        s.read_at(&mut b, 0).unwrap();
        s.debug_event(Event::WriteAio);
        s.debug_event(Event::ReadAio);
        assert_eq!(
            s.read_at(&mut b, 0).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert_eq!(s.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn json_and_opts_names() {
        let mut m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"driver":"qcow2","file":{"driver":"blkdebug","inject-error":[{"event":"write_aio","errno":28,"once":true}],"image":{"driver":"file","filename":"x"}}}"#,
        )
        .unwrap();
        let c = unwrap_json(&mut m).unwrap().unwrap();
        assert_eq!(c.inject[0].errno, 28);
        assert!(c.inject[0].once);
        assert_eq!(m["file"]["filename"], "x");
        let mut f: BTreeMap<String, String> = [
            ("driver", "blkdebug"),
            ("image.driver", "qcow2"),
            ("image.file.filename", "y"),
            ("align", "4k"),
            ("max-transfer", "64k"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(unwrap_opts(&mut f).unwrap(), None);
        assert_eq!(f["file.filename"], "y");
        assert_eq!(f["driver"], "qcow2");
        let mut bad: BTreeMap<String, String> = [("driver", "blkdebug"), ("align", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(unwrap_opts(&mut bad).is_err());
    }
}
