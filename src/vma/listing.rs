//! What `vma list` and `vma config` print, line for line (vma.md "The reference command
//! line"), so that scripts written for Proxmox's tool parse vimg's output unchanged.

use super::format::ArchiveHeader;

/// The `list` output: a `CFG:` line per config file, a `DEV:` line per device (`VMSTATE:` for
/// the RAM state), by increasing id, and last the creation time as C's `ctime` prints it in
/// the local time zone.
pub fn render_list(header: &ArchiveHeader) -> String {
    let mut s = String::new();
    for c in &header.configs {
        s.push_str(&format!("CFG: size: {} name: {}\n", c.data.len(), c.name));
    }
    for d in &header.devices {
        if d.is_vmstate() {
            s.push_str(&format!("VMSTATE: dev_id={} memory: {}\n", d.id, d.size));
        } else {
            s.push_str(&format!(
                "DEV: dev_id={} size: {} devname: {}\n",
                d.id, d.size, d.name
            ));
        }
    }
    s.push_str("CTIME: ");
    s.push_str(&ctime(header.ctime));
    s
}

/// `t` (seconds since the epoch) as C's `ctime` renders it in the local time zone:
/// `Tue Nov 14 22:13:20 2023` and a newline. A time the C library cannot represent comes out
/// as `(null)`, as printing C's null result does.
pub fn ctime(t: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // time_t is 64 bits on most targets, where this cannot fail.
    #[allow(irrefutable_let_patterns)]
    let Ok(tt) = libc::time_t::try_from(t) else {
        return "(null)\n".to_string();
    };
    // SAFETY: `libc::tm` is a plain C struct of integers (and, on glibc, a pointer to a
    // static zone name), for which all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers come from live references to properly typed values for the
    // duration of the call; localtime_r is the thread-safe variant that writes only `tm`.
    let ok = unsafe { !libc::localtime_r(&tt, &mut tm).is_null() };
    if !ok {
        return "(null)\n".to_string();
    }
    let day = usize::try_from(tm.tm_wday).ok().and_then(|i| DAYS.get(i));
    let month = usize::try_from(tm.tm_mon).ok().and_then(|i| MONTHS.get(i));
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}\n",
        day.unwrap_or(&"???"),
        month.unwrap_or(&"???"),
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tm.tm_year as i64 + 1900
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vma::format::ArchiveHeader;

    #[test]
    fn list_lines_follow_the_reference_tool() {
        let mut h = ArchiveHeader::new([0; 16], 0);
        h.add_config("qemu-server.conf", vec![b'x'; 417]).unwrap();
        h.add_device("drive-scsi0", 34359738368).unwrap();
        h.add_device("vmstate", 1 << 20).unwrap();
        let out = render_list(&h);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "CFG: size: 417 name: qemu-server.conf");
        assert_eq!(
            lines[1],
            "DEV: dev_id=1 size: 34359738368 devname: drive-scsi0"
        );
        assert_eq!(lines[2], "VMSTATE: dev_id=2 memory: 1048576");
        assert!(lines[3].starts_with("CTIME: "), "{out}");
        assert!(out.ends_with('\n'));
    }
}
