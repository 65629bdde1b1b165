//! `vimg`, the command-line tool: parses arguments, calls the library ([`vimg::ops`]) and prints.
//!
//! Errors become one line, `vimg: <error>`, on standard error, and an exit code in qemu-img's
//! conventions: 1 for failures in general, 2 for errors in `compare`, and `check`'s own codes.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use vimg::open::{OpenOptions, Sharing};
use vimg::ops::{self, OutputFormat};
use vimg::prealloc::Preallocation;
use vimg::{Error, ImageFormat};

/// Virtual disk image tool for raw and qcow2 images, an alternative to qemu-img.
#[derive(Parser, Debug)]
#[command(name = "vimg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// A qemu object: `secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]` (kept by id
    /// for encrypted images) or `tls-creds-x509,id=ID,dir=DIR,endpoint=client|server[,verify-peer=on|off]`
    /// (NBD over TLS: `tls-creds=ID` in an nbd image's options, `serve --tls-creds ID`); other
    /// object types are refused.
    #[arg(long = "object", global = true, value_name = "OBJECTDEF")]
    object: Vec<String>,
    /// Image names are qemu option lists: `driver=qcow2,file.filename=NAME,file.locking=off`
    /// (drivers raw and qcow2 over file or host_device). Without it, `json:{...}` and
    /// `file:NAME` names are understood too.
    #[arg(long = "image-opts", global = true)]
    image_opts: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what an image is: format, sizes, backing file, snapshots, format details. An OVA
    /// appliance shows its disk: `vm.ova` (one disk) or `ova:vm.ova,disk=NAME`.
    Info(InfoArgs),
    /// Show where each range of the virtual disk is stored.
    Map(MapArgs),
    /// Compare the guest data of two images (exit 0 same, 1 different, 2 error).
    Compare(CompareArgs),
    /// Check an image's consistency (exit 0 clean, 1 incomplete, 2 corrupt, 3 leaks, 63 no check).
    Check(CheckArgs),
    /// Convert images (several are concatenated) to a sparse raw file or a new qcow2 image
    /// (-c compresses, -B leaves what a backing file holds unallocated).
    Convert(ConvertArgs),
    /// Create a new raw or qcow2 image (qemu-img's options; `-o help` lists them).
    Create(CreateCmdArgs),
    /// Change the virtual size of an image (shrinking needs --shrink).
    Resize(ResizeArgs),
    /// Show how much host space a new raw or qcow2 image needs (--size SIZE or IMAGE).
    Measure(MeasureArgs),
    /// List (-l), create (-c), apply (-a) or delete (-d) internal snapshots of a qcow2 image.
    Snapshot(SnapshotArgs),
    /// Write an overlay's data into its backing file (or into -b BASE further down the chain),
    /// then empty the overlay (unless -d or -b).
    Commit(CommitArgs),
    /// Change the backing file of a qcow2 image, copying what differs (-u: only the header;
    /// -b "": no backing file).
    Rebase(RebaseArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (in the order
    /// given).
    Bitmap(BitmapCmdArgs),
    /// Change format options of a qcow2 image in place (compat, refcount_bits, lazy_refcounts,
    /// size, backing_file; `-o help` lists them).
    Amend(AmendCmdArgs),
    /// VM backups in Proxmox's VMA format: create, extract, verify, list, config.
    Backup(BackupArgs),
    /// Copy part of an image into a new image, as dd(1) (operands if=, of=, bs=, count=,
    /// skip=; count counts from the start of the input, as in qemu-img).
    Dd(DdArgs),
    /// Export an image over NBD, as qemu-nbd does (a TCP port, 10809 by default, or -k SOCKET).
    Serve(ServeArgs),
    /// Send one command to the control socket of `vimg serve --control SOCKET` and print its
    /// return value as JSON (exit 1 with its error).
    Control(ControlArgs),
}

#[derive(Args, Debug)]
struct ControlArgs {
    /// The control socket.
    socket: PathBuf,
    /// The command (query-exports, export-add, backup-start, query-jobs, ...).
    command: String,
    /// Its arguments, a JSON object.
    arguments: Option<String>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Image format; probed when not given.
    #[arg(short = 'f', long = "format", value_name = "FORMAT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Export read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Send writes to a temporary qcow2 overlay over FILE (removed at exit).
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Export internal snapshot SNAPSHOT_PARAM read-only (snapshot.id=ID,snapshot.name=NAME,
    /// or an id or name alone).
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT_PARAM")]
    load_snapshot: Option<String>,
    /// Export name (default: the empty string).
    #[arg(
        short = 'x',
        long = "export-name",
        value_name = "NAME",
        default_value = ""
    )]
    export_name: String,
    /// A human-readable description of the export.
    #[arg(short = 'D', long = "description", value_name = "TEXT")]
    description: Option<String>,
    /// TCP port to listen on.
    #[arg(
        short = 'p',
        long = "port",
        value_name = "PORT",
        default_value_t = 10809
    )]
    port: u16,
    /// Interface to bind to.
    #[arg(
        short = 'b',
        long = "bind",
        value_name = "IFACE",
        default_value = "0.0.0.0"
    )]
    bind: String,
    /// Listen on the Unix socket PATH instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Serve at most NUM clients at once (0: no limit).
    #[arg(short = 'e', long = "shared", value_name = "NUM", default_value_t = 1)]
    shared: usize,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Expose persistent dirty bitmap NAME as the context qemu:dirty-bitmap:NAME.
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    bitmaps: Vec<String>,
    /// Expose the allocation depth as the context qemu:allocation-depth.
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Cache mode: writeback (default), writethrough, none, directsync, unsafe.
    #[arg(long = "cache", value_name = "MODE")]
    cache: Option<String>,
    /// Disable the host cache (--cache=none).
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// AIO mode (native, io_uring, threads): accepted for compatibility.
    #[arg(long = "aio", value_name = "MODE")]
    aio: Option<String>,
    /// Discard mode: ignore (default) or unmap.
    #[arg(long = "discard", value_name = "MODE")]
    discard: Option<String>,
    /// Detect-zeroes mode: off (default), on, unmap.
    #[arg(long = "detect-zeroes", value_name = "MODE")]
    detect_zeroes: Option<String>,
    /// Fork off the server and return once it is listening.
    #[arg(long = "fork")]
    fork: bool,
    /// Write the server's process id to PATH.
    #[arg(long = "pid-file", value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Seconds a client has to finish the handshake (0: no limit).
    #[arg(long = "handshake-limit", value_name = "N", default_value_t = 10)]
    handshake_limit: u64,
    /// Require clients to use TLS, with the server credentials of --object
    /// tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off] (DIR holds
    /// ca-cert.pem, server-cert.pem and server-key.pem; with verify-peer, on by default, each
    /// client must present a certificate signed by ca-cert.pem).
    #[arg(long = "tls-creds", value_name = "ID")]
    tls_creds: Option<String>,
    /// Print more (accepted for compatibility).
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// A control socket (JSON in the spirit of QMP: exports, dirty bitmaps, live backups);
    /// the server is then persistent.
    #[arg(long = "control", value_name = "SOCKET")]
    control: Option<PathBuf>,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct DdArgs {
    /// Format of the input (raw, qcow2); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Format of the output: raw (default) or qcow2.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    output_format: ImageFormat,
    /// Read the input even if another process is writing it.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
    #[arg(value_name = "OPERAND")]
    operands: Vec<String>,
}

#[derive(Args, Debug)]
struct CommitArgs {
    /// Format of IMAGE (qcow2); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Cache mode of the images written: writeback (default), writethrough, none, directsync,
    /// or unsafe (no waiting for the disk); none and directsync open them with O_DIRECT.
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback")]
    cache: String,
    /// The layer of the backing chain to commit into, instead of the backing file (implies
    /// -d, as in qemu-img).
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<String>,
    /// Do not empty IMAGE afterwards.
    #[arg(short = 'd')]
    drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Write at most RATE bytes per second (k, M, G suffixes; 0: no limit).
    #[arg(short = 'r', value_name = "RATE", allow_hyphen_values = true)]
    rate: Option<String>,
    /// The overlay.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct RebaseArgs {
    /// Format of IMAGE (qcow2); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Only change the header: no data is copied, and the new backing file need not exist.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file (recorded as given; relative names are relative to IMAGE), or ""
    /// for none.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the new backing file (required with -b, as in qemu-img).
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Write the copied clusters compressed.
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of IMAGE: writeback (default), writethrough, none, directsync, or unsafe;
    /// none and directsync open it with O_DIRECT.
    #[arg(short = 't', value_name = "CACHE", default_value = "writeback")]
    cache: String,
    /// Cache mode of the new backing file (only read): none and directsync read it with
    /// O_DIRECT.
    #[arg(short = 'T', value_name = "CACHE")]
    backing_cache: Option<String>,
    /// Accepted for qemu-img compatibility: as with qemu-img, the image and its backing files
    /// are locked as usual (the image is written).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Back up images (any format vimg reads, with their backing chains) into a VMA archive, or - for standard output.
    Create(BackupCreateArgs),
    /// Restore an archive (or - for standard input; zstd/gzip detected) into a new directory,
    /// or devices into existing images or block devices (--target, -r).
    Extract(BackupExtractArgs),
    /// Check a whole archive: headers, digests, uuids, structure, device bounds, duplicates
    /// and completeness.
    Verify(BackupVerifyArgs),
    /// List an archive's configs and devices, as Proxmox's `vma list` does.
    List(BackupListArgs),
    /// Print a config file stored in an archive, as Proxmox's `vma config` does.
    Config(BackupConfigArgs),
}

#[derive(Args, Debug)]
struct BackupCreateArgs {
    /// A config file to store, by its base name (repeatable).
    #[arg(short = 'c', value_name = "CONFIG")]
    configs: Vec<PathBuf>,
    /// A device to back up: [format=FMT:]DEVNAME=PATH (repeatable, up to 254).
    #[arg(short = 'd', value_name = "[format=FMT:]DEVNAME=PATH")]
    devices: Vec<String>,
    /// Compress the whole archive stream (as vzdump's .vma.zst / .vma.gz).
    #[arg(long, value_name = "zstd|gzip", value_parser = ["zstd", "gzip"])]
    compress: Option<String>,
    /// Show progress (on standard error).
    #[arg(short = 'p')]
    progress: bool,
    /// Print what was stored per device (on standard error).
    #[arg(short = 'v')]
    verbose: bool,
    /// Back up the EXPORTs of a running `vimg serve --control SOCKET` while they are in use,
    /// consistent across them at the start (instead of -d images).
    #[arg(long = "server", value_name = "SOCKET", conflicts_with = "devices")]
    server: Option<PathBuf>,
    /// With --server: milliseconds the archive may take nothing (or a guest write wait for
    /// it) before the job aborts so that the guest goes on (default 5000).
    #[arg(long = "stall-timeout", value_name = "MS", requires = "server")]
    stall_timeout: Option<u64>,
    /// With --server: instead of an archive, a qcow2 backup of one EXPORT from its persistent
    /// dirty bitmap BITMAP (full without --previous, which begins a chain); the bitmap is reset
    /// only if the backup succeeds.
    #[arg(long = "incremental", value_name = "BITMAP", requires = "server", conflicts_with_all = ["configs", "compress", "stall_timeout"])]
    incremental: Option<String>,
    /// With --incremental: the previous backup of the chain (qcow2 or raw), the new one's
    /// backing file (relative to the new one's directory).
    #[arg(long = "previous", value_name = "PATH", requires = "incremental")]
    previous: Option<String>,
    /// The archive to write (must not exist), or - for standard output.
    archive: PathBuf,
    /// With --server: the exports to back up (archive devices take their names).
    #[arg(value_name = "EXPORT", requires = "server")]
    exports: Vec<String>,
}

#[derive(Args, Debug)]
struct BackupExtractArgs {
    /// Restore only these devices (comma-separated names).
    #[arg(short = 'd', value_name = "DEV,DEV")]
    devices: Option<String>,
    /// Format of the restored images: raw (sparse) or qcow2 (zero clusters unallocated).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    output_format: ImageFormat,
    /// Options of the qcow2 images, as `vimg create -o` takes them (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Show progress (on standard error).
    #[arg(short = 'p')]
    progress: bool,
    /// Restore device DEVNAME into PATH, an existing raw image or block device (or qcow2
    /// image, with format=qcow2:), written in place: never created, truncated or removed. It
    /// must be at least the device's size (the rest is left as it is). What the archive holds
    /// as zeros is zeroed there (a hole or the device's own zeroing where it can, written
    /// zeros otherwise), unless --target-is-zero. Repeatable; devices without one go to TARGET_DIR, which may be left
    /// out when every device has one (then no config file is written).
    #[arg(long = "target", value_name = "[format=FMT:]DEVNAME=PATH")]
    targets: Vec<String>,
    /// The --target images read as zeros already, so zero clusters are not written to them.
    #[arg(long = "target-is-zero", requires = "targets")]
    target_is_zero: bool,
    /// Read which device goes where from MAP (a file or fifo, read after the archive's
    /// contents are printed), as Proxmox's `vma extract -r`: lines
    /// [format=FMT:]0|1:DEVNAME=PATH (1: zero clusters are zeroed, 0: the target reads as
    /// zeros) or skip=DEVNAME, up to `done` or an empty line. Every device needs a line.
    #[arg(short = 'r', value_name = "MAP", conflicts_with = "targets")]
    map: Option<PathBuf>,
    /// Print progress lines on standard output, as Proxmox's `vma extract -v`.
    #[arg(short = 'v')]
    verbose: bool,
    /// The archive, or - for standard input.
    archive: PathBuf,
    /// The directory to restore into (must not exist): configs, the VM state, and the devices
    /// without a target.
    target_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BackupVerifyArgs {
    /// Also list the archive's contents and what each device holds.
    #[arg(short = 'v')]
    verbose: bool,
    /// Show progress (on standard error).
    #[arg(short = 'p')]
    progress: bool,
    /// The archive, or - for standard input.
    archive: PathBuf,
}

#[derive(Args, Debug)]
struct BackupListArgs {
    /// The archive, or - for standard input.
    archive: PathBuf,
}

#[derive(Args, Debug)]
struct BackupConfigArgs {
    /// The config file to print.
    #[arg(short = 'c', value_name = "NAME", default_value = "qemu-server.conf")]
    config: String,
    /// The archive, or - for standard input.
    archive: PathBuf,
}

#[derive(Args, Debug)]
struct BitmapCmdArgs {
    /// Image format (raw, qcow2); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Create the bitmap (enabled unless --disable is given too).
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    add: Vec<bool>,
    /// Delete the bitmap.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    remove: Vec<bool>,
    /// Clear all bits of the bitmap.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    clear: Vec<bool>,
    /// Track writes in the bitmap.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    enable: Vec<bool>,
    /// Stop tracking writes in the bitmap.
    #[arg(long, action = clap::ArgAction::Append, num_args = 0, default_missing_value = "true")]
    disable: Vec<bool>,
    /// Set every bit set in bitmap SOURCE (of the image, or of -b FILE).
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
    /// Granularity of a new bitmap, bytes per bit (k, M, G suffixes).
    #[arg(short = 'g', long = "granularity", value_name = "GRANULARITY")]
    granularity: Option<String>,
    /// Image holding the --merge sources.
    #[arg(short = 'b', value_name = "SOURCE_FILE")]
    source_file: Option<PathBuf>,
    /// Format of SOURCE_FILE.
    #[arg(short = 'F', value_name = "SOURCE_FMT", value_parser = parse_format)]
    source_format: Option<ImageFormat>,
    /// The image, then the bitmap's name.
    #[arg(value_name = "FILENAME BITMAP")]
    args: Vec<String>,
}

#[derive(Args, Debug)]
struct AmendCmdArgs {
    /// Image format (only qcow2 can be amended); probed when not given.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Cache mode: writeback (default), writethrough, none, directsync, or unsafe (no
    /// waiting for the disk); none and directsync open the image with O_DIRECT.
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Accepted for qemu-img compatibility (it only matters for encryption key slots).
    #[arg(long)]
    force: bool,
    /// Options to change, comma-separated (repeatable; `-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The image.
    filename: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct MeasureArgs {
    /// Format of IMAGE (raw, qcow2); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Format of the image to measure for: raw (default) or qcow2.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    output_format: String,
    /// Options of the new image, as `create -o` takes them (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Measure an empty image of this size instead of IMAGE (k, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    size: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Read IMAGE even if another process is writing it (take no lock that keeps writers out).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image whose data the new image would hold.
    #[arg(value_name = "IMAGE")]
    files: Vec<PathBuf>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["list", "create", "apply", "delete"])))]
struct SnapshotArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot of the current state named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the disk to snapshot NAME (or id).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete snapshot NAME.
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct ResizeArgs {
    /// Image format (raw, qcow2); probed when not given.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Allow making the image smaller (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Preallocation of the grown area: off, metadata (qcow2 only), falloc or full.
    #[arg(long = "preallocation", value_name = "MODE", value_parser = parse_prealloc, default_value = "off")]
    preallocation: Preallocation,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    filename: PathBuf,
    /// The new size, or +SIZE / -SIZE relative to the current one (k, M, G, T suffixes).
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Args, Debug)]
struct CreateCmdArgs {
    /// Format of the new image: raw or qcow2.
    #[arg(short = 'f', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    format: ImageFormat,
    /// Format options, comma-separated (repeatable; `-o help` lists them).
    /// `encrypt.format=aes,encrypt.key-secret=ID` (or `encryption=on`) makes a legacy AES
    /// encrypted qcow2 image, a weak scheme: the key is the first 16 bytes of the passphrase
    /// and a wrong one goes unnoticed; qemu's system emulators refuse such images.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file (recorded as given; relative names are relative to IMAGE).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (required with -b, as in qemu-img).
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (it need not exist; SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image to create.
    filename: Option<PathBuf>,
    /// Size (k, M, G, T suffixes); taken from the backing file when omitted.
    size: Option<String>,
}

/// Options every command that opens an image shares.
#[derive(Args, Debug)]
struct ImageArgs {
    /// Image format (raw, qcow2); probed when not given.
    #[arg(short = 'f', long = "format", value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Read the image even if another process is writing it (take no lock that keeps writers
    /// out); only for read-only use.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

#[derive(Args, Debug)]
struct InfoArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Describe every layer of the backing chain, top first.
    #[arg(long)]
    backing_chain: bool,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct MapArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Guest offset to start at (bytes, or with a k/M/G/T suffix).
    #[arg(long, value_name = "OFFSET", value_parser = parse_size, default_value = "0",
          allow_negative_numbers = true)]
    start_offset: u64,
    /// Map at most this many bytes.
    #[arg(long, value_name = "LENGTH", value_parser = parse_size, allow_negative_numbers = true)]
    max_length: Option<u64>,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Format of the first image; probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format_a: Option<ImageFormat>,
    /// Format of the second image; probed when not given.
    #[arg(short = 'F', value_name = "FMT", value_parser = parse_format)]
    format_b: Option<ImageFormat>,
    /// Strict mode: different sizes or allocation status are mismatches too.
    #[arg(short = 's', long)]
    strict: bool,
    /// Print nothing; only the exit code tells.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Read the images even if another process is writing them (take no lock that keeps
    /// writers out).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Cache mode of the images: none and directsync read them with O_DIRECT.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Accepted for qemu-img compatibility (compare shows no progress).
    #[arg(short = 'p')]
    progress: bool,
    /// The first image.
    a: PathBuf,
    /// The second image.
    b: PathBuf,
}

#[derive(Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    image: ImageArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Print less.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Repair: `leaks` frees leaked clusters; `all` also fixes refcounts that are too low,
    /// COPIED flags, and the dirty and corrupt bits (qcow2).
    #[arg(short = 'r', value_name = "leaks|all", value_parser = ["leaks", "all"])]
    repair: Option<String>,
    /// Cache mode of the image: none and directsync read it with O_DIRECT.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// The image.
    filename: PathBuf,
}

#[derive(Args, Debug)]
struct ConvertArgs {
    /// Format of the sources (all of them); probed when not given.
    #[arg(short = 'f', value_name = "FMT", value_parser = parse_format)]
    format: Option<ImageFormat>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw", value_parser = parse_format)]
    output_format: ImageFormat,
    /// Options for a new qcow2 target, as `vimg create -o` takes them (repeatable).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Store qcow2 clusters compressed, with the target's compression type (parallel).
    #[arg(short = 'c')]
    compress: bool,
    /// Backing file of the new qcow2 image (recorded as given, relative to the target):
    /// clusters that read the same in it are left unallocated.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the backing file (required with -B).
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Cache mode of the target: unsafe (default, as qemu-img convert: no waiting for the
    /// disk), or writeback, writethrough, none, directsync (wait for the disk at the end);
    /// none and directsync write it with O_DIRECT, aligned to the device's logical block.
    #[arg(short = 't', value_name = "CACHE", default_value = "unsafe")]
    cache: String,
    /// Zero blocks of this size are left as holes (multiple of 512, at most 16M; 0 allocates
    /// everything).
    #[arg(short = 'S', value_name = "SIZE", value_parser = parse_sparse,
          allow_negative_numbers = true)]
    sparse_size: Option<u64>,
    /// Cache mode of the sources: none and directsync read them with O_DIRECT.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Copy at most RATE bytes of the disk per second (k, M, G suffixes; 0: no limit).
    #[arg(short = 'r', value_name = "RATE", allow_hyphen_values = true)]
    rate: Option<String>,
    /// Copy offloading, as qemu-img's -C: not with -c, -S or --salvage. vimg copies with its
    /// own reads and writes either way (the output is the same; qemu also falls back to them
    /// where the file system cannot offload).
    #[arg(short = 'C')]
    copy_offload: bool,
    /// Ranges of the sources that cannot be read are written as zeros, with a warning.
    #[arg(long)]
    salvage: bool,
    /// The target is a qemu option list, as --image-opts (needs -n).
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Do not create the target: write into the existing one (a file, or a block device such
    /// as an LVM volume or a zvol, which is never truncated, renamed or removed). Every range
    /// the source reads as zero is zeroed in the target: on a device by a write-zeroes request
    /// that may unmap (fallocate punch; thin volumes and SSDs then free the space), else by
    /// BLKZEROOUT, else by writing zero buffers.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the target reads as zeros already (a new thin volume, a zeroed device), so
    /// ranges the source reads as zero are not written at all.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    /// Worker threads copying data (1 to 16; default 4, and for -c one per CPU up to 4).
    #[arg(short = 'm', value_name = "N", value_parser = parse_threads)]
    threads: Option<usize>,
    /// Allow out-of-order writes: qcow2 clusters are allocated as workers finish, not in
    /// guest order.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Copy the source's persistent dirty bitmaps to the (qcow2) target.
    #[arg(long)]
    bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps (with a warning) instead of failing.
    #[arg(long)]
    skip_broken_bitmaps: bool,
    /// Read the sources even if another process is writing them (take no lock that keeps
    /// writers out of them; the target is locked as always).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Read the sources as internal snapshot SNAPSHOT was: snapshot.id=ID,
    /// snapshot.name=NAME, or an id or name alone (an id matches first).
    #[arg(short = 'l', long = "source-snapshot", value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// The source images (concatenated, in order), then the image to write.
    #[arg(value_name = "SRC... DST")]
    files: Vec<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

impl From<Output> for OutputFormat {
    fn from(o: Output) -> Self {
        match o {
            Output::Human => OutputFormat::Human,
            Output::Json => OutputFormat::Json,
        }
    }
}

fn parse_format(s: &str) -> Result<ImageFormat, String> {
    ImageFormat::from_name(s).map_err(|e| e.what().to_string())
}

fn parse_size(s: &str) -> Result<u64, String> {
    ops::size::parse_size(s).map_err(|e| e.what().to_string())
}

fn parse_threads(s: &str) -> Result<usize, String> {
    let e = |_| {
        ops::convert::validate_threads(0)
            .unwrap_err()
            .what()
            .to_string()
    };
    let n: usize = s.trim().parse().map_err(e)?;
    ops::convert::validate_threads(n).map_err(|e| e.what().to_string())
}

fn parse_sparse(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    ops::convert::validate_sparse_size(n).map_err(|e| e.what().to_string())
}

/// A failure: the message (already one line) and the exit code.
struct Failure {
    message: String,
    code: u8,
}

impl Failure {
    fn new(err: Error, code: u8) -> Self {
        Failure {
            message: err.to_string(),
            code,
        }
    }
}

type CmdResult = Result<u8, Failure>;

fn main() -> ExitCode {
    // Partial outputs are removed if SIGINT, SIGTERM or SIGHUP stops a command.
    vimg::interrupt::install();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(1);
            }
            eprintln!(
                "{}: {} (see 'vimg --help')",
                prog(),
                one_line(&e.to_string())
            );
            return ExitCode::from(1);
        }
    };
    IMAGE_OPTS.store(cli.image_opts, std::sync::atomic::Ordering::Relaxed);
    match vimg::secret::Secrets::from_objects(&cli.object)
        .and_then(|s| vimg::nbd::tls::register_objects(s.tls_objects()).map(|()| s))
    {
        Ok(secrets) => {
            let _ = SECRETS.set(secrets);
        }
        Err(e) => {
            eprintln!("{}: {e}", prog());
            return ExitCode::from(1);
        }
    }
    let result = match cli.command {
        Command::Info(a) => info(a),
        Command::Map(a) => map(a),
        Command::Compare(a) => compare(a),
        Command::Check(a) => check(a),
        Command::Convert(a) => convert(a),
        Command::Create(a) => create(a),
        Command::Resize(a) => resize(a),
        Command::Measure(a) => measure(a),
        Command::Snapshot(a) => snapshot(a),
        Command::Commit(a) => commit(a),
        Command::Rebase(a) => rebase(a),
        Command::Bitmap(a) => bitmap(a),
        Command::Amend(a) => amend(a),
        Command::Backup(a) => backup(a),
        Command::Dd(a) => dd(a),
        Command::Serve(a) => serve(a),
        Command::Control(a) => control(a),
    };
    // NBD connections are kept for the whole command (see vimg::nbd::client): end them.
    vimg::nbd::client::close_all();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            let _ = std::io::stdout().flush();
            for part in f.message.split(vimg::error::REPORT_BREAK) {
                eprintln!("{}: {}", prog(), part);
            }
            ExitCode::from(f.code)
        }
    }
}

/// `--image-opts` was given: image names are qemu option lists.
static IMAGE_OPTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The secrets of `--object secret,...`, by id (for encrypted images).
static SECRETS: std::sync::OnceLock<vimg::secret::Secrets> = std::sync::OnceLock::new();

/// An image named on the command line in one of qemu's spellings, resolved.
struct Named {
    /// The file holding the image.
    path: PathBuf,
    /// `-f`, or the format the spec names.
    format: Option<ImageFormat>,
    /// `-U`, or a spec saying `force-share=on` or `locking=off` (for read-only opens).
    force_share: bool,
    /// The spec names qemu's null driver rather than a file (a read-only source).
    null: Option<vimg::null::NullSpec>,
    /// The spec says `cache.direct=on`.
    direct: bool,
}

/// Resolves an image name: a plain file name, `json:{...}`, `file:NAME`, or with
/// `--image-opts` an option list (see [`vimg::image_spec`]). qemu's null driver is refused:
/// only the commands that read a source take it ([`resolve_source`]).
fn resolve(
    name: &std::path::Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> Result<Named, Failure> {
    let n = resolve_source(name, format, force_share)?;
    if n.null.is_some() {
        return Err(Failure {
            message: format!(
                "{}: qemu's null driver is only read as a source here (by map, convert, \
                 compare, dd and measure)",
                name.display()
            ),
            code: 1,
        });
    }
    Ok(n)
}

/// As [`resolve`], for a source that is only read: qemu's null driver is accepted.
fn resolve_source(
    name: &std::path::Path,
    format: Option<ImageFormat>,
    force_share: bool,
) -> Result<Named, Failure> {
    resolve_as(
        name,
        format,
        force_share,
        IMAGE_OPTS.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn resolve_as(
    name: &std::path::Path,
    format: Option<ImageFormat>,
    force_share: bool,
    image_opts: bool,
) -> Result<Named, Failure> {
    let say = |m: String| Failure {
        message: m,
        code: 1,
    };
    if image_opts && format.is_some() {
        return Err(say(
            "--image-opts and --format are mutually exclusive".into()
        ));
    }
    let text = name.to_string_lossy();
    if !image_opts && !text.contains(':') {
        return Ok(Named {
            path: name.to_path_buf(),
            format,
            force_share,
            null: None,
            direct: false,
        });
    }
    let spec = if image_opts {
        vimg::image_spec::parse_image_opts(&text)
    } else {
        vimg::image_spec::parse_filename(&text)
    }
    .map_err(|e| say(e.to_string()))?;
    opener().add_spec(&spec);
    Ok(Named {
        direct: spec.cache_direct(),
        path: spec.path,
        format: spec.format.or(format),
        force_share: force_share || spec.force_share || spec.locking == Some(false),
        null: spec.null,
    })
}

/// Checks a `-T` cache mode, with qemu-img's message for a bad one; returns whether the
/// sources are read bypassing the host's cache (`none`, `directsync`: `O_DIRECT`).
fn src_cache_direct(mode: &Option<String>) -> Result<bool, Failure> {
    let Some(t) = mode else {
        return Ok(false);
    };
    match ops::commit::CacheMode::parse(t) {
        Ok(m) => Ok(m.direct()),
        Err(_) => Err(Failure {
            message: format!("Invalid source cache option: {t}"),
            code: 1,
        }),
    }
}

/// The name messages start with: `qemu-img` when vimg was installed under that name (a link
/// named `qemu-img`, so that scripts matching qemu-img's messages keep matching), else `vimg`.
fn prog() -> &'static str {
    static NAME: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let argv0 = std::env::args_os().next().unwrap_or_default();
        match std::path::Path::new(&argv0).file_name() {
            Some(n) if n == "qemu-img" => "qemu-img",
            _ => "vimg",
        }
    })
}

/// clap's error text on one line: the message and its details, without the usage block.
fn one_line(text: &str) -> String {
    let mut parts = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    if parts.is_empty() {
        "invalid arguments".to_string()
    } else {
        parts.join(" ")
    }
}

/// The sharing of read-only opens: `-U` forces sharing, else qemu-img's default.
fn sharing(force_share: bool) -> Sharing {
    if force_share {
        Sharing::ForceShare
    } else {
        Sharing::Normal
    }
}

/// The opener of this process's one command: what its image names ask for particular files
/// (blkdebug rules, a `data-file`) applies to every open the command makes, as qemu's
/// options do.
fn opener() -> &'static vimg::opener::Opener {
    static OPENER: std::sync::OnceLock<vimg::opener::Opener> = std::sync::OnceLock::new();
    OPENER.get_or_init(|| {
        let opener = vimg::opener::Opener::default();
        // What qemu prints on standard error while it opens images, as it prints it.
        opener.set_notices(std::sync::Arc::new(|line: &str| eprintln!("{line}")));
        if let Some(secrets) = SECRETS.get() {
            opener.set_secrets(secrets.clone());
        }
        opener
    })
}

fn open(
    path: &std::path::Path,
    format: Option<ImageFormat>,
    sharing: Sharing,
) -> Result<Box<dyn vimg::BlockImage>, Error> {
    open_with(path, format, sharing, false)
}

/// [`open`], with qemu's `cache.direct` (`O_DIRECT`) when `cache_direct`.
fn open_with(
    path: &std::path::Path,
    format: Option<ImageFormat>,
    sharing: Sharing,
    cache_direct: bool,
) -> Result<Box<dyn vimg::BlockImage>, Error> {
    let image = vimg::open::open_image(
        path,
        &OpenOptions {
            format,
            writable: false,
            no_backing: false,
            sharing,
            opener: opener().clone(),
            cache_direct,
        },
    )?;
    // A backing format the image does not record had to be guessed: say so, as info does.
    let mut layer: &dyn vimg::BlockImage = image.as_ref();
    while let Some(below) = layer.backing() {
        if let Some(w) = layer
            .layer_info()
            .ok()
            .and_then(|i| ops::info::backing_format_warning(layer, &i))
        {
            eprintln!("{}: warning: {w}", prog());
        }
        layer = below;
    }
    Ok(image)
}

/// Opens a resolved image name read-only: a file as [`open`] does, or qemu's null driver;
/// with `O_DIRECT` if `direct` (`-T none`) or the name says `cache.direct=on`.
fn open_named(
    n: &Named,
    sharing: Sharing,
    direct: bool,
) -> Result<Box<dyn vimg::BlockImage>, Error> {
    match n.null {
        Some(spec) => Ok(Box::new(vimg::null::NullImage::new(spec, &n.path))),
        None => open_with(&n.path, n.format, sharing, n.direct || direct),
    }
}

fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .map_err(|e| Failure::new(Error::io("cannot write output", e), 1))
}

fn info(a: InfoArgs) -> CmdResult {
    // qemu-img's info does no guest I/O: an external data file is not needed.
    opener().set_metadata_only(true);
    let n = resolve(&a.filename, a.image.format, a.image.force_share)?;
    let opts = ops::info::InfoOptions {
        format: n.format,
        backing_chain: a.backing_chain,
        sharing: sharing(n.force_share),
        opener: opener().clone(),
    };
    let layers = ops::info::collect(&n.path, &opts).map_err(|e| Failure::new(e, 1))?;
    for w in layers.iter().flat_map(|l| &l.warnings) {
        eprintln!("{}: warning: {w}", prog());
    }
    match OutputFormat::from(a.output) {
        OutputFormat::Json => print(&ops::info::render_json(&layers, a.backing_chain))?,
        OutputFormat::Human => print(&ops::info::render_human(&layers))?,
    }
    Ok(0)
}

fn map(a: MapArgs) -> CmdResult {
    let n = resolve_source(&a.filename, a.image.format, a.image.force_share)?;
    let image = open_named(&n, sharing(n.force_share), false).map_err(|e| Failure::new(e, 1))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let r = match OutputFormat::from(a.output) {
        OutputFormat::Json => {
            ops::map::write_json(image.as_ref(), a.start_offset, a.max_length, &mut out)
        }
        OutputFormat::Human => {
            ops::map::write_human(image.as_ref(), a.start_offset, a.max_length, &mut out)
        }
    };
    let flushed = out.flush();
    r.map_err(|e| Failure::new(e, 1))?;
    flushed.map_err(|e| Failure::new(Error::io("cannot write output", e), 1))?;
    Ok(0)
}

fn compare(a: CompareArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 2);
    let code2 = |f: Failure| Failure { code: 2, ..f };
    let direct = src_cache_direct(&a.src_cache).map_err(code2)?;
    let _ = a.progress;
    let na = resolve_source(&a.a, a.format_a, a.force_share).map_err(code2)?;
    let nb = resolve_source(&a.b, a.format_b, a.force_share).map_err(code2)?;
    let img_a = open_named(&na, sharing(na.force_share), direct).map_err(fail)?;
    let img_b = open_named(&nb, sharing(nb.force_share), direct).map_err(fail)?;
    let outcome = match ops::compare::compare_detailed(
        img_a.as_ref(),
        img_b.as_ref(),
        &ops::compare::CompareOptions { strict: a.strict },
    ) {
        Ok(o) => o,
        Err(ops::compare::CompareError::Read {
            image,
            offset,
            size_warning,
            error,
        }) => {
            let name = if image == 0 { &a.a } else { &a.b };
            return compare_read_failure(
                &name.to_string_lossy(),
                offset,
                size_warning,
                a.quiet,
                &error,
            );
        }
        Err(e) => return Err(fail(e.into_error())),
    };
    if !a.quiet {
        let mut text = outcome.messages().join("\n");
        text.push('\n');
        print(&text).map_err(|f| Failure { code: 2, ..f })?;
    }
    Ok(outcome.exit_code() as u8)
}

/// qemu-img compare's report of a failed read of guest data: `Error while reading offset N of
/// NAME: CAUSE` (the name as given), exit code 4. The size warning qemu-img printed before goes
/// to standard output, which qemu-img buffers when it is not a terminal, so that there it comes
/// after the error.
fn compare_read_failure(
    name: &str,
    offset: u64,
    size_warning: bool,
    quiet: bool,
    error: &Error,
) -> CmdResult {
    let cause = std::error::Error::source(error)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(vimg::error::os_reason)
        .unwrap_or_else(|| error.to_string());
    let message = format!("Error while reading offset {offset} of {name}: {cause}");
    let warning = size_warning && !quiet;
    if warning && std::io::stdout().is_terminal() {
        print("Warning: Image size mismatch!\n")?;
    } else if warning {
        eprintln!("{}: {message}", prog());
        print("Warning: Image size mismatch!\n")?;
        return Ok(4);
    }
    Err(Failure { message, code: 4 })
}

fn check(mut a: CheckArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let direct = src_cache_direct(&a.src_cache)?;
    let n = resolve(&a.filename, a.image.format, a.image.force_share)?;
    let direct = direct || n.direct;
    (a.filename, a.image.format) = (n.path, n.format);
    a.image.force_share = n.force_share && a.repair.is_none() || a.image.force_share;
    // qemu-img's exact words, which scripts (and qemu's iotests) match; the file is the one
    // named on the command line.
    let not_supported = || Failure {
        message: ops::check::NOT_SUPPORTED.to_string(),
        code: ops::check::EXIT_NOT_SUPPORTED as u8,
    };
    let (report, format) = match a.repair.as_deref() {
        // -r: repair a qcow2 image in place; the report is the check that follows.
        Some(mode) => {
            vimg::open::refuse_forced_write(sharing(a.image.force_share), true)
                .map_err(|e| Failure::new(e.with_path(&a.filename), 1))?;
            let format = match a.image.format {
                Some(f) => f,
                None => vimg::open::probe_format_with(&opener().with_direct(direct), &a.filename)
                    .map_err(fail)?,
            };
            let repaired =
                format
                    .driver()
                    .repair(&a.filename, mode == "all", &opener().with_direct(direct));
            (repaired.ok_or_else(not_supported)?.map_err(fail)?, format)
        }
        None => {
            let sh = sharing(a.image.force_share);
            let image = open_with(&a.filename, a.image.format, sh, direct);
            // A format that opens images for a check more leniently (vhdx) checks them so.
            let lenient = image.as_ref().err().and_then(|_| {
                let o = opener().with_direct(direct);
                let f = a
                    .image
                    .format
                    .or_else(|| vimg::open::probe_format_with(&o, &a.filename).ok())?;
                Some((f.driver().check_unopenable(&a.filename, sh, &o)?, f))
            });
            if let Some((report, format)) = lenient {
                return finish_check(&a, report, format);
            }
            let image =
                image.map_err(
                    |e| match ops::check::open_failure_message(&a.filename, &e) {
                        Some(m) => {
                            eprintln!("{}: {m}", prog());
                            Failure {
                                message: "Check failed: File too large".into(),
                                code: 1,
                            }
                        }
                        None => fail(e),
                    },
                )?;
            let report = ops::check::check(image.as_ref())
                .map_err(|e| match ops::check::abort_reason(&e) {
                    // qemu-img's two messages: why, then that the check failed.
                    Some(reason) => {
                        eprintln!("{}: {e}", prog());
                        Failure {
                            message: format!("Check failed: {reason}"),
                            code: 1,
                        }
                    }
                    None => fail(e),
                })?
                .ok_or_else(not_supported)?;
            (report, image.format())
        }
    };
    finish_check(&a, report, format)
}

/// Prints a finished check (or repair) as qemu-img does and returns its exit code.
fn finish_check(a: &CheckArgs, report: vimg::check::CheckReport, format: ImageFormat) -> CmdResult {
    for m in &report.messages {
        eprintln!("{m}");
    }
    match OutputFormat::from(a.output) {
        OutputFormat::Json => print(&ops::check::render_json(
            &report,
            &a.filename.display().to_string(),
            format.as_str(),
        ))?,
        OutputFormat::Human if !a.quiet => {
            if report.leaks_fixed + report.corruptions_fixed > 0 {
                print(&format!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                    report.leaks_fixed, report.corruptions_fixed
                ))?;
            }
            print(&ops::check::render_human(&report))?;
        }
        OutputFormat::Human => {}
    }
    Ok(ops::check::exit_code(&report) as u8)
}

/// Parses a `--preallocation` mode for `resize`.
fn parse_prealloc(s: &str) -> Result<Preallocation, String> {
    Preallocation::from_name(s).map_err(|e| e.to_string())
}

fn resize(mut a: ResizeArgs) -> CmdResult {
    let n = resolve(&a.filename, a.format, false)?;
    (a.filename, a.format) = (n.path, n.format);
    let msg = ops::resize::resize_prealloc(
        &a.filename,
        a.format,
        &a.size,
        a.shrink,
        a.preallocation,
        opener(),
    )
    .map_err(|e| Failure::new(e, 1))?;
    if !a.quiet {
        print(&format!("{msg}\n"))?;
    }
    Ok(0)
}

fn snapshot(mut a: SnapshotArgs) -> CmdResult {
    let n = resolve(&a.filename, a.image.format, a.image.force_share)?;
    (a.filename, a.image.format) = (n.path, n.format);
    a.image.force_share |= n.force_share && a.list;
    let op = match (a.list, a.create, a.apply, a.delete) {
        (true, None, None, None) => ops::snapshot::SnapshotOp::List,
        (false, Some(n), None, None) => ops::snapshot::SnapshotOp::Create(n),
        (false, None, Some(n), None) => ops::snapshot::SnapshotOp::Apply(n),
        (false, None, None, Some(n)) => ops::snapshot::SnapshotOp::Delete(n),
        _ => {
            return Err(Failure {
                message: "Cannot mix '-l', '-a', '-c', '-d'".into(),
                code: 1,
            })
        }
    };
    let out = ops::snapshot::run(
        &a.filename,
        a.image.format,
        &op,
        sharing(a.image.force_share),
        opener(),
    )
    .map_err(|e| Failure::new(e, 1))?;
    if !a.quiet {
        print(&out)?;
    }
    Ok(0)
}

/// The operations of `vimg bitmap` in command-line order (clap keeps each flag's positions).
fn bitmap_actions(a: &BitmapCmdArgs) -> Vec<ops::bitmap::BitmapAction> {
    use clap::CommandFactory;
    use ops::bitmap::BitmapAction as A;
    let matches = Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok();
    let Some(m) = matches
        .as_ref()
        .and_then(|m| m.subcommand_matches("bitmap"))
    else {
        return Vec::new();
    };
    let mut found: Vec<(usize, A)> = Vec::new();
    let flags = [
        ("add", A::Add),
        ("remove", A::Remove),
        ("clear", A::Clear),
        ("enable", A::Enable),
        ("disable", A::Disable),
    ];
    let given = |id| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    for (id, action) in flags.into_iter().filter(|(id, _)| given(id)) {
        for i in m.indices_of(id).into_iter().flatten() {
            found.push((i, action.clone()));
        }
    }
    let merges = m.indices_of("merge").into_iter().flatten();
    for (i, src) in merges.zip(&a.merge) {
        found.push((i, A::Merge(src.clone())));
    }
    found.sort_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, x)| x).collect()
}

fn bitmap(a: BitmapCmdArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let say = |m: String| Failure {
        message: m,
        code: 1,
    };
    let granularity = match &a.granularity {
        // 0 means the default, as for qemu-img.
        Some(g) => match ops::size::parse_size(g) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => return Err(say(format!("Invalid granularity specified: '{g}'."))),
        },
        None => None,
    };
    let mut args = ops::bitmap::BitmapArgs {
        format: a.format,
        actions: bitmap_actions(&a),
        granularity,
        source_file: a.source_file.clone(),
        source_format: a.source_format,
        opener: opener().clone(),
        ..Default::default()
    };
    ops::bitmap::validate(&args).map_err(fail)?;
    let [file, name] = a.args.as_slice() else {
        return Err(say("Expecting filename and bitmap name".into()));
    };
    let n = resolve(std::path::Path::new(file), args.format, false)?;
    (args.filename, args.format) = (n.path, n.format);
    args.name = name.clone();
    ops::bitmap::run(&args).map_err(fail)?;
    Ok(0)
}

fn amend(a: AmendCmdArgs) -> CmdResult {
    opener().set_force(a.force);
    let fail = |e| Failure::new(e, 1);
    if ops::amend::wants_help(&a.options).map_err(fail)? {
        print(&ops::amend::help(a.format, a.filename.as_deref()).map_err(fail)?)?;
        return Ok(0);
    }
    let Some(filename) = a.filename else {
        return Err(fail(Error::invalid_input(ops::amend::NO_IMAGE)));
    };
    let n = resolve(&filename, a.format, false)?;
    let (filename, format) = (n.path, n.format);
    // `none` and `directsync` open the image with O_DIRECT; a bad mode is refused by amend.
    let direct = ops::commit::CacheMode::parse(a.cache.as_deref().unwrap_or("writeback"))
        .is_ok_and(|m| m.direct());
    let args = ops::amend::AmendArgs {
        format,
        options: &a.options,
        cache: a.cache.as_deref(),
        opener: opener().with_direct(direct),
    };
    let show = a.progress && !a.quiet;
    let mut text = ops::amend::AmendProgressText::new();
    ops::amend::amend(&filename, &args, &mut |done, total| {
        if let Some(line) = text.update(done, total).filter(|_| show) {
            let _ = print(&line);
        }
    })
    .map_err(fail)?;
    if show {
        print("\n")?;
    }
    Ok(0)
}

fn create(a: CreateCmdArgs) -> CmdResult {
    if IMAGE_OPTS.load(std::sync::atomic::Ordering::Relaxed) {
        // As in qemu-img, whose create does not take it: the new image is named by a file name.
        return Err(Failure {
            message: "create: --image-opts is not an option of create (name the new file)".into(),
            code: 1,
        });
    }
    if ops::create::wants_help(&a.options).map_err(|e| Failure::new(e, 1))? {
        let name = a.filename.as_ref().map(|f| f.to_string_lossy());
        let help = ops::create::options_help(a.format, name.as_deref());
        print(&help.map_err(|e| Failure::new(e, 1))?)?;
        return Ok(0);
    }
    let Some(given) = a.filename else {
        return Err(Failure {
            message: "create: expecting the name of the image to create".into(),
            code: 1,
        });
    };
    // `file:NAME` names the file NAME, as in qemu-img (which prints the name as given).
    let given_text = given.to_string_lossy().into_owned();
    let filename = match given_text.strip_prefix("file:") {
        Some(_) => {
            vimg::image_spec::parse_filename(&given_text)
                .map_err(|e| Failure::new(e, 1))?
                .path
        }
        None => given.clone(),
    };
    let weak = weak_encryption(&a.options);
    let args = ops::create::CreateArgs {
        format: a.format,
        filename: filename.clone(),
        options: a.options,
        backing_file: a.backing,
        backing_format: a.backing_format,
        unsafe_backing: a.unsafe_backing,
        size: a.size,
        opener: opener().clone(),
    };
    let plan = ops::create::prepare(&args).map_err(|e| Failure::new(e, 1))?;
    if !a.quiet {
        let line = plan.formatting_line().replacen(
            &format!("'{}'", filename.display()),
            &format!("'{given_text}'"),
            1,
        );
        print(&format!("{line}\n"))?;
    }
    plan.execute().map_err(|e| Failure::new(e, 1))?;
    if weak {
        eprintln!("{}: warning: {}", prog(), vimg::qcow2::WEAK_AES);
    }
    Ok(0)
}

/// Whether `-o` lists ask for legacy AES encryption, of which vimg warns once on creation,
/// to a person: on a terminal, and not under the name qemu-img (which creates such images
/// silently, and whose output scripts compare line by line).
fn weak_encryption(options: &[String]) -> bool {
    use std::io::IsTerminal;
    prog() == "vimg"
        && std::io::stderr().is_terminal()
        && matches!(new_encryption(options).format(), Ok(Some("aes")))
}

/// The encryption options of `-o` lists for a new image.
fn new_encryption(options: &[String]) -> vimg::qcow2::EncryptOptions {
    let mut u = vimg::qcow2::OptionUpdates::default();
    for o in options {
        if let Ok(x) = vimg::qcow2::parse_options(o) {
            u.merge(x);
        }
    }
    u.encrypt
}

/// The library's convert options from the command line.
fn convert_options(a: &ConvertArgs) -> ops::convert::ConvertOptions {
    ops::convert::ConvertOptions {
        output_format: a.output_format,
        sparse_size: a
            .sparse_size
            .unwrap_or(ops::convert::ConvertOptions::default().sparse_size),
        no_create: a.no_create,
        target_is_zero: a.target_is_zero,
        threads: a.threads.unwrap_or_else(|| {
            let compresses = a.compress || a.output_format.driver().target_compresses(&a.options);
            ops::convert::default_threads(compresses)
        }),
        compress: a.compress,
        target_options: a.options.clone(),
        backing_file: a.backing.clone(),
        backing_format: a.backing_format.clone(),
        out_of_order: a.out_of_order,
        sync: a.cache != "unsafe",
        bitmaps: a.bitmaps,
        skip_broken_bitmaps: a.skip_broken_bitmaps,
        salvage: a.salvage,
        quiet: a.quiet,
        rate_limit: 0,
        copy_offload: a.copy_offload,
        // `-t none` and `-t directsync` write the target with O_DIRECT.
        opener: opener()
            .with_direct(ops::commit::CacheMode::parse(&a.cache).is_ok_and(|m| m.direct())),
    }
}

fn convert(a: ConvertArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let help = ops::create::wants_help(&a.options).map_err(fail)?;
    let say = |m: &str| Failure {
        message: m.into(),
        code: 1,
    };
    if a.compress && a.copy_offload {
        return Err(say("Cannot enable copy offloading when -c is used"));
    }
    if a.sparse_size.is_some() && a.copy_offload {
        return Err(say("Cannot enable copy offloading when -S is used"));
    }
    if a.copy_offload && a.salvage {
        return Err(say("Cannot use copy offloading in salvaging mode"));
    }
    if a.target_image_opts && !a.no_create {
        return Err(say("--target-image-opts requires use of -n flag"));
    }
    if help && !a.no_create {
        // The new image's name counts once a source is named too, as in qemu-img.
        let name = a.files.last().filter(|_| a.files.len() > 1);
        let name = name.map(|f| f.to_string_lossy());
        print(&ops::create::options_help(a.output_format, name.as_deref()).map_err(fail)?)?;
        return Ok(0);
    }
    let Some((target, sources)) = a.files.split_last().filter(|(_, s)| !s.is_empty()) else {
        return Err(Failure {
            message: "Must specify image file name".into(),
            code: 1,
        });
    };
    let src_direct = src_cache_direct(&a.src_cache)?;
    ops::commit::CacheMode::parse(&a.cache).map_err(fail)?;
    let mut opts = convert_options(&a);
    if let Some(r) = &a.rate {
        opts.rate_limit = ops::commit::parse_rate_limit(r).map_err(fail)?;
    }
    let named = sources
        .iter()
        .map(|s| resolve_source(s, a.format, a.force_share))
        .collect::<Result<Vec<_>, _>>()?;
    let target_named;
    let target = if a.target_image_opts {
        let t = resolve_as(target, None, false, true)?;
        // The driver the options name is the target's format, as in qemu-img.
        if let Some(f) = t.format {
            opts.output_format = f;
        }
        target_named = t.path;
        &target_named
    } else if a.no_create && target.to_string_lossy().starts_with("blkdebug:") {
        // An existing target behind qemu's fault-injection driver (see vimg::blkdebug).
        target_named = resolve_as(target, None, false, false)?.path;
        &target_named
    } else {
        target
    };
    ops::convert::validate(sources.len(), target, &opts).map_err(fail)?;
    let encrypt = new_encryption(&a.options);
    if a.compress && !a.no_create && (encrypt.alias == Some(true) || encrypt.format.is_some()) {
        return Err(say(
            "Compression and encryption not supported at the same time",
        ));
    }
    if !a.no_create && weak_encryption(&a.options) {
        eprintln!("{}: warning: {}", prog(), vimg::qcow2::WEAK_AES);
    }
    let snapshot = a
        .snapshot
        .as_deref()
        .map(vimg::qcow2::SnapshotSelector::parse)
        .transpose()
        .map_err(fail)?;
    if snapshot.is_some() && sources.len() > 1 {
        return Err(Failure {
            message: "No support for concatenating multiple snapshot".into(),
            code: 1,
        });
    }
    let opened = named
        .iter()
        // qemu-img convert keeps writers out of its sources (raw ones too) unless -U.
        .map(|n| match &snapshot {
            Some(sel) => vimg::qcow2::open_image_snapshot(
                &n.path,
                n.format,
                sel,
                &opener().with_direct(src_direct || n.direct),
            ),
            None => {
                let sh = match n.force_share {
                    true => Sharing::ForceShare,
                    false => Sharing::NoWriters,
                };
                open_named(n, sh, src_direct)
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    let sources: Vec<&dyn vimg::BlockImage> = opened.iter().map(|b| b.as_ref()).collect();
    if let (true, [src]) = (opts.bitmaps, sources.as_slice()) {
        let (_, warnings) = ops::convert::source_bitmaps(*src, &opts).map_err(fail)?;
        for w in warnings {
            eprintln!("{}: warning: {w}", prog());
        }
    }
    let total = sources
        .iter()
        .fold(0u64, |t, s| t.saturating_add(s.virtual_size()));
    let show = a.progress && !a.quiet;
    let result = if show && std::io::stdout().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        ) {
            bar.set_style(style);
        }
        let r = ops::convert::convert(
            &sources,
            target,
            &opts,
            Some(&|done, _total| bar.set_position(done)),
        );
        if r.is_ok() {
            bar.finish();
        } else {
            bar.abandon();
        }
        r
    } else if show {
        let text = ops::convert::TextProgress::new();
        let r = ops::convert::convert(
            &sources,
            target,
            &opts,
            Some(&|done, total| {
                // Holding the output while deciding keeps lines from several threads in order.
                let mut out = std::io::stdout().lock();
                if let Some(line) = text.update(done, total) {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.flush();
                }
            }),
        );
        if r.is_ok() {
            print("\n")?;
        }
        r
    } else {
        ops::convert::convert(&sources, target, &opts, None)
    };
    result.map_err(fail)?;
    Ok(0)
}

fn serve(a: ServeArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let _ = a.verbose;
    let n = resolve(&a.filename, a.format, false)?;
    let cache = match (&a.cache, a.nocache) {
        (Some(c), _) => ops::serve::parse_cache(c).map_err(fail)?,
        (None, true) => vimg::nbd::server::CacheMode::None,
        (None, false) => Default::default(),
    };
    if let Some(aio) = &a.aio {
        ops::serve::check_aio(aio).map_err(fail)?;
    }
    let discard_unmap = match &a.discard {
        Some(d) => ops::serve::parse_discard(d).map_err(fail)?,
        None => false,
    };
    let detect_zeroes = match &a.detect_zeroes {
        Some(d) => ops::serve::parse_detect_zeroes(d).map_err(fail)?,
        None => Default::default(),
    };
    let address = match &a.socket {
        Some(p) => vimg::nbd::server::Address::Unix(p.clone()),
        None => vimg::nbd::server::Address::Tcp {
            host: a.bind.clone(),
            port: a.port,
        },
    };
    let tls = match &a.tls_creds {
        Some(id) => Some(vimg::nbd::tls::ServerTls::from_id(id).map_err(|e| {
            let what = format!("Failed to get TLS creds: {}", e.what());
            fail(e.reworded(what))
        })?),
        None => None,
    };
    let opts = ops::serve::ServeOptions {
        path: n.path.clone(),
        format: n.format,
        opener: opener().clone(),
        direct: n.direct,
        readonly: a.read_only,
        snapshot: a.snapshot,
        load_snapshot: a.load_snapshot.clone(),
        bitmaps: a.bitmaps.clone(),
        allocation_depth: a.allocation_depth,
        export_name: a.export_name.clone(),
        description: a.description.clone(),
        cache,
        discard_unmap,
        detect_zeroes,
        listen: vimg::nbd::server::ListenConfig {
            address,
            persistent: a.persistent,
            shared: a.shared,
            handshake_limit: (a.handshake_limit > 0)
                .then(|| std::time::Duration::from_secs(a.handshake_limit)),
            fork: a.fork,
            pid_file: a.pid_file.clone(),
            tls,
        },
        control: a.control.clone(),
    };
    ops::serve::serve(&opts).map_err(fail)?;
    Ok(0)
}

fn control(a: ControlArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let args: serde_json::Value = match &a.arguments {
        Some(t) => serde_json::from_str(t).map_err(|e| {
            fail(Error::invalid_input(format!("arguments are not JSON: {e}")).bare())
        })?,
        None => serde_json::json!({}),
    };
    if !args.is_object() {
        return Err(fail(
            Error::invalid_input("arguments must be a JSON object").bare(),
        ));
    }
    let mut client =
        vimg::live::control::client::ControlClient::connect(&a.socket).map_err(fail)?;
    let r = client.execute(&a.command, args).map_err(fail)?;
    let text = serde_json::to_string_pretty(&r).unwrap_or_else(|_| r.to_string());
    // A reader that has seen enough (`| grep -q`) is not an error of the command.
    let _ = writeln!(std::io::stdout(), "{text}");
    Ok(0)
}

fn dd(a: DdArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let operands = ops::dd::parse_operands(&a.operands).map_err(fail)?;
    let n = resolve_source(
        std::path::Path::new(&operands.input),
        a.format,
        a.force_share,
    )?;
    let src = open_named(&n, sharing(n.force_share), false).map_err(fail)?;
    let outcome = ops::dd::dd(src.as_ref(), &operands, a.output_format, opener()).map_err(fail)?;
    if let Some(w) = outcome.warning {
        eprintln!("{}: {w}", prog());
    }
    Ok(0)
}

fn measure(a: MeasureArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let say = |m: &str| Failure {
        message: m.to_string(),
        code: 1,
    };
    let size = match &a.size {
        Some(t) => Some(ops::measure::parse_measure_size(t).map_err(fail)?),
        None => None,
    };
    if a.files.len() > 1 {
        return Err(say("At most one filename argument is allowed."));
    }
    let file = a.files.first();
    if file.is_some() && size.is_some() {
        return Err(say("--size N cannot be used together with a filename."));
    }
    if file.is_none() && size.is_none() {
        return Err(say("Either --size N or one filename must be specified."));
    }
    let source = match file {
        Some(f) => {
            let n = resolve_source(f, a.format, a.force_share)?;
            Some(open_named(&n, sharing(n.force_share), false).map_err(fail)?)
        }
        None => None,
    };
    let target = match ImageFormat::from_name(&a.output_format) {
        Ok(f) => f,
        Err(_) if ops::create::KNOWN_FORMATS.contains(&a.output_format.as_str()) => {
            return Err(say(&format!(
                "Block driver '{}' does not support size measurement",
                a.output_format
            )))
        }
        Err(_) => return Err(say(&format!("Unknown file format '{}'", a.output_format))),
    };
    let secrets = opener().secrets();
    let m = ops::measure::measure(target, &a.options, size, source.as_deref(), &secrets)
        .map_err(fail)?;
    print(&ops::measure::render(&m, a.output.into()))?;
    Ok(0)
}

/// Runs `f` with qemu-img's text progress (`    (NN.NN/100%)` and carriage returns) on
/// standard output when `show`, ending the progress line after a success.
fn with_text_progress<T>(
    show: bool,
    f: impl FnOnce(Option<ops::convert::Progress<'_>>) -> Result<T, Error>,
) -> Result<T, Error> {
    if !show {
        return f(None);
    }
    let text = ops::convert::TextProgress::new();
    let report = |done: u64, total: u64| {
        let mut out = std::io::stdout().lock();
        if let Some(line) = text.update(done, total) {
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    };
    let r = f(Some(&report));
    if r.is_ok() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\n").and_then(|_| out.flush());
    }
    r
}

fn commit(mut a: CommitArgs) -> CmdResult {
    let fail = |e| Failure::new(e, 1);
    let n = resolve(&a.filename, a.format, false)?;
    (a.filename, a.format) = (n.path, n.format);
    let cache = ops::commit::CacheMode::parse(&a.cache).map_err(fail)?;
    let rate_limit = match &a.rate {
        Some(r) => ops::commit::parse_rate_limit(r).map_err(fail)?,
        None => 0,
    };
    let opts = ops::commit::CommitOptions {
        format: a.format,
        base: a.base.clone(),
        drop: a.drop,
        rate_limit,
        cache,
        opener: opener().with_direct(cache.direct()),
    };
    let msg = with_text_progress(a.progress && !a.quiet, |p| {
        ops::commit::commit(&a.filename, &opts, p)
    })
    .map_err(fail)?;
    if !a.quiet {
        print(&format!("{msg}\n"))?;
    }
    Ok(0)
}

fn rebase(mut a: RebaseArgs) -> CmdResult {
    let _ = a.force_share;
    let fail = |e| Failure::new(e, 1);
    let n = resolve(&a.filename, a.format, false)?;
    (a.filename, a.format) = (n.path, n.format);
    let cache = ops::commit::CacheMode::parse(&a.cache).map_err(fail)?;
    let backing_direct = src_cache_direct(&a.backing_cache)?;
    let opts = ops::rebase::RebaseOptions {
        format: a.format,
        backing: a.backing.clone(),
        backing_format: a.backing_format.clone(),
        unsafe_mode: a.unsafe_mode,
        compress: a.compress,
        cache,
        backing_direct,
        opener: opener().with_direct(cache.direct()),
    };
    with_text_progress(a.progress && !a.quiet, |p| {
        ops::rebase::rebase(&a.filename, &opts, p)
    })
    .map_err(fail)?;
    Ok(0)
}

/// Runs `f` with a progress callback drawing on standard error when `show` (a bar on a
/// terminal, `    (NN.NN/100%)` lines otherwise), and with none otherwise.
fn with_stderr_progress<T>(
    show: bool,
    f: impl FnOnce(Option<&(dyn Fn(u64, u64) + Sync)>) -> Result<T, Error>,
) -> Result<T, Error> {
    if !show {
        return f(None);
    }
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        ) {
            bar.set_style(style);
        }
        let r = f(Some(&|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        }));
        if r.is_ok() {
            bar.finish();
        } else {
            bar.abandon();
        }
        r
    } else {
        let text = ops::convert::TextProgress::new();
        let r = f(Some(&|done, total| {
            let mut err = std::io::stderr().lock();
            if let Some(line) = text.update(done, total) {
                let _ = err.write_all(line.as_bytes());
            }
        }));
        if r.is_ok() {
            eprintln!();
        }
        r
    }
}

fn backup(a: BackupArgs) -> CmdResult {
    use ops::backup::{self as b, ArchivePath};
    use vimg::vma::stream::Compression;
    let fail = |e| Failure::new(e, 1);
    match a.command {
        BackupCommand::Create(c) if c.incremental.is_some() => {
            let socket = c.server.unwrap_or_default();
            let bitmap = c.incremental.unwrap_or_default();
            let target = ArchivePath::from_arg(&c.archive);
            let info = with_stderr_progress(c.progress, |p| {
                let prev = c.previous.as_deref();
                b::live::incremental_on_server(&socket, &target, &c.exports, &bitmap, prev, p)
            })
            .map_err(fail)?;
            if c.verbose {
                eprintln!(
                    "job {}: {} bytes to copy, {} bytes written, {} zero bytes",
                    info["id"].as_str().unwrap_or(""),
                    info["total-progress"],
                    info["bytes-written"],
                    info["zero-bytes"],
                );
            }
            Ok(0)
        }
        BackupCommand::Create(c) if c.server.is_some() => {
            let opts = b::CreateOptions {
                configs: c.configs,
                compression: match c.compress.as_deref() {
                    Some(name) => Compression::from_name(name).map_err(fail)?,
                    None => Compression::None,
                },
            };
            let archive = ArchivePath::from_arg(&c.archive);
            let socket = c.server.unwrap_or_default();
            let info = with_stderr_progress(c.progress, |p| {
                b::live::create_on_server(&socket, &archive, &c.exports, &opts, c.stall_timeout, p)
            })
            .map_err(fail)?;
            if c.verbose {
                eprintln!(
                    "job {}: {} clusters read by the job, {} saved before guest writes, {} not \
                     read (zero), {} bytes read, {} archive bytes",
                    info["id"].as_str().unwrap_or(""),
                    info["clusters-by-job"],
                    info["clusters-by-hook"],
                    info["clusters-unread"],
                    info["bytes-read"],
                    info["archive-bytes"]
                );
            }
            Ok(0)
        }
        BackupCommand::Create(c) => {
            let specs = c
                .devices
                .iter()
                .map(|d| b::parse_device_spec(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            let opened = specs
                .iter()
                .map(|s| open(&s.path, s.format, Sharing::Normal))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            let sources: Vec<(&str, &dyn vimg::BlockImage)> = specs
                .iter()
                .zip(&opened)
                .map(|(s, i)| (s.name.as_str(), i.as_ref()))
                .collect();
            let opts = b::CreateOptions {
                configs: c.configs,
                compression: match c.compress.as_deref() {
                    Some(name) => Compression::from_name(name).map_err(fail)?,
                    None => Compression::None,
                },
            };
            let archive = ArchivePath::from_arg(&c.archive);
            let stats =
                with_stderr_progress(c.progress, |p| b::create(&archive, &sources, &opts, p))
                    .map_err(fail)?;
            if c.verbose {
                eprintln!(
                    "archive: {} clusters ({} zero), {} data bytes, {} extents, {} bytes; \
                     {} bytes read, {} clusters not read (zero)",
                    stats.archive.clusters,
                    stats.archive.zero_clusters,
                    stats.archive.data_blocks * 4096,
                    stats.archive.extents,
                    stats.archive.bytes,
                    stats.bytes_read,
                    stats.clusters_unread
                );
            }
            Ok(0)
        }
        BackupCommand::Extract(x) => {
            let targets = x
                .targets
                .iter()
                .map(|t| b::parse_target_spec(t, x.target_is_zero))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?;
            let opts = b::ExtractOptions {
                devices: x.devices.map(|l| {
                    l.split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                }),
                format: x.output_format,
                options: x.options,
                opener: opener().clone(),
                targets: b::DeviceTargets {
                    list: targets,
                    complete: false,
                },
            };
            if x.target_dir.is_none() && (x.map.is_some() || opts.targets.list.is_empty()) {
                return Err(fail(Error::invalid_input(
                    "a target directory must be given (it may be left out only when --target \
                     gives every device its target)",
                )));
            }
            let archive = ArchivePath::from_arg(&x.archive);
            let start = b::begin_extract(&archive, x.target_dir.as_deref(), &opts).map_err(fail)?;
            let plan = match &x.map {
                Some(map) => {
                    // As vma: the contents first (the map's writer may read them to decide),
                    // then the map.
                    print(&vimg::vma::listing::render_list(start.header()))?;
                    let file = std::fs::File::open(map)
                        .map_err(|e| fail(Error::io("unable to open the map", e).with_path(map)))?;
                    let targets =
                        b::read_restore_map(std::io::BufReader::new(file), map).map_err(fail)?;
                    start.plan(&targets).map_err(fail)?
                }
                None => {
                    let plan = start.plan(&opts.targets).map_err(fail)?;
                    let mut lines = String::new();
                    for d in plan.devices() {
                        lines.push_str(&format!("DEVINFO {} {}\n", d.path.display(), d.size));
                    }
                    print(&lines)?;
                    plan
                }
            };
            if x.verbose {
                let started = std::time::Instant::now();
                let last = std::sync::Mutex::new(None::<u64>);
                let report = move |done: u64, total: u64| {
                    let percent = (done * 100).checked_div(total).unwrap_or(100);
                    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
                    if *last != Some(percent) {
                        *last = Some(percent);
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(
                            out,
                            "progress {percent}% (read {done} bytes, duration {} sec)",
                            started.elapsed().as_secs()
                        );
                        let _ = out.flush();
                    }
                };
                plan.run(Some(&report)).map_err(fail)?;
            } else {
                with_stderr_progress(x.progress, |p| plan.run(p)).map_err(fail)?;
            }
            Ok(0)
        }
        BackupCommand::Verify(v) => {
            let archive = ArchivePath::from_arg(&v.archive);
            let (header, tally) =
                with_stderr_progress(v.progress, |p| b::verify(&archive, p)).map_err(fail)?;
            if v.verbose {
                let mut s = vimg::vma::listing::render_list(&header);
                for d in &header.devices {
                    let t = &tally.devices[d.id as usize];
                    s.push_str(&format!(
                        "device {} ({}): {} clusters, {} zero, {} data bytes\n",
                        d.id,
                        d.name,
                        t.clusters,
                        t.zero_clusters,
                        t.data_blocks * 4096
                    ));
                }
                s.push_str(&format!(
                    "verified: {} extents, {} bytes, uuid {}\n",
                    tally.extents,
                    tally.bytes,
                    vimg::vma::uuid_string(&header.uuid)
                ));
                print(&s)?;
            }
            Ok(0)
        }
        BackupCommand::List(l) => {
            let r = b::open_archive(&ArchivePath::from_arg(&l.archive)).map_err(fail)?;
            print(&vimg::vma::listing::render_list(r.header()))?;
            Ok(0)
        }
        BackupCommand::Config(c) => {
            let archive = ArchivePath::from_arg(&c.archive);
            let r = b::open_archive(&archive).map_err(fail)?;
            let data = b::find_config(r.header(), &c.config)
                .map_err(|e| fail(e.with_path(archive.display_path(true))))?;
            let mut out = std::io::stdout().lock();
            out.write_all(data)
                .and_then(|_| out.flush())
                .map_err(|e| Failure::new(Error::io("cannot write output", e), 1))?;
            Ok(0)
        }
    }
}
