//! The few `bpf(2)` commands aya 0.14 does not give for XDP links, on the kernel's
//! stable `union bpf_attr` layouts:
//!
//! - create a link with no netlink fallback (`Xdp::attach` falls back to a netlink
//!   attachment, which has no pin and no atomic replace);
//! - pin that link and open its pin again (aya's `FdLink` can pin, but cannot be made
//!   from a link created here: its constructor is the crate's own);
//! - replace a pinned link's program atomically, and read the link's interface (a link
//!   whose interface went away is defunct; aya's `LinkInfo` has no ifindex);
//! - find and detach another tool's links (`BPF_LINK_GET_NEXT_ID`, `GET_FD_BY_ID`,
//!   `LINK_DETACH`);
//! - read, write and delete many map entries in one call (`BPF_MAP_*_BATCH`; aya makes
//!   one or two calls per entry, and a policy of a million rules is millions of
//!   entries).
//!
//! A program's id is aya's (`Xdp::info`).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `enum bpf_attach_type`: BPF_XDP.
const BPF_XDP: u32 = 37;
/// `XDP_FLAGS_SKB_MODE`, `XDP_FLAGS_DRV_MODE`.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// Large enough for every `union bpf_attr` member used here, zero-filled.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn u64_at(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Attach `prog` to interface `ifindex` through a BPF link (`flags`: one of the XDP
/// mode flags). Fails with EBUSY if another program is attached without a link.
pub fn xdp_link_create(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32_at(0, prog.as_raw_fd() as u32);
    a.u32_at(4, ifindex);
    a.u32_at(8, BPF_XDP);
    a.u32_at(12, flags);
    owned(bpf(BPF_LINK_CREATE, &mut a)?)
}

/// Pin an object (link, map, program) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64);
    a.u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(|_| ())
}

/// Open a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    let mut a = Attr::new();
    a.u64_at(0, p.as_ptr() as u64);
    owned(bpf(BPF_OBJ_GET, &mut a)?)
}

/// Atomically replace the program of `link` by `new_prog`.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32_at(0, link.as_raw_fd() as u32);
    a.u32_at(4, new_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a).map(|_| ())
}

/// What the kernel says of an XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the interface is gone (the link is then defunct).
    pub ifindex: u32,
}

/// `bpf_link_info` of an XDP link.
pub fn xdp_link_info(link: BorrowedFd<'_>) -> io::Result<XdpLinkInfo> {
    // struct bpf_link_info { u32 type; u32 id; u32 prog_id; union (8-aligned) { … xdp { u32 ifindex } } }
    let mut info = [0u8; 64];
    let mut a = Attr::new();
    a.u32_at(0, link.as_raw_fd() as u32);
    a.u32_at(4, info.len() as u32);
    a.u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    let u =
        |off: usize| u32::from_ne_bytes([info[off], info[off + 1], info[off + 2], info[off + 3]]);
    Ok(XdpLinkInfo {
        link_id: u(4),
        prog_id: u(8),
        ifindex: u(16),
    })
}

const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_link_type`: BPF_LINK_TYPE_XDP.
const BPF_LINK_TYPE_XDP: u32 = 6;

/// Detach the XDP links on `ifindex` that run program `prog_id` (another tool's, for
/// `--replace`): the kernel keeps a link as long as its owner holds it, so it must be
/// detached, not closed. An ifindex alone names an interface only within one network
/// namespace, and the link's info does not say which: the program id narrows it to
/// the one attached here. Returns how many were detached.
pub fn detach_xdp_links(ifindex: u32, prog_id: u32) -> io::Result<usize> {
    let mut id = 0u32;
    let mut n = 0;
    // Bounded: link ids are finite; stop after a generous number of them.
    for _ in 0..1_000_000 {
        let mut a = Attr::new();
        a.u32_at(0, id);
        match bpf(BPF_LINK_GET_NEXT_ID, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        id = u32::from_ne_bytes([a.0[4], a.0[5], a.0[6], a.0[7]]);
        let mut g = Attr::new();
        g.u32_at(0, id);
        let Ok(fd) = bpf(BPF_LINK_GET_FD_BY_ID, &mut g).and_then(owned) else {
            continue;
        };
        let mut info = [0u8; 64];
        let mut q = Attr::new();
        q.u32_at(0, fd.as_raw_fd() as u32);
        q.u32_at(4, info.len() as u32);
        q.u64_at(8, info.as_mut_ptr() as u64);
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut q).is_err() {
            continue;
        }
        let ty = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        let prog = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]);
        let ifi = u32::from_ne_bytes([info[16], info[17], info[18], info[19]]);
        if ty == BPF_LINK_TYPE_XDP && ifi == ifindex && prog == prog_id {
            let mut d = Attr::new();
            d.u32_at(0, fd.as_raw_fd() as u32);
            bpf(BPF_LINK_DETACH, &mut d)?;
            n += 1;
        }
    }
    Ok(n)
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per batch call: bounds the buffers and how long one call holds the CPU.
const CHUNK: usize = 65_536;

/// How a map's batch position is kept between calls.
#[derive(Clone, Copy, Debug)]
pub enum Position {
    /// A bucket index (hash maps).
    Bucket,
    /// The last key read (arrays and tries), `key_size` bytes.
    Key,
}

/// Every entry of a map, read with `BPF_MAP_LOOKUP_BATCH` many at a time: its keys and
/// its values as raw bytes, `key_size` and `value_size` bytes each (a per-CPU map's
/// value is one 8-aligned value per possible CPU), in the same order. An entry added
/// or removed meanwhile may be missed or seen.
pub fn map_entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    position: Position,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut kbuf = vec![0u8; CHUNK * key_size];
    let mut vbuf = vec![0u8; CHUNK * value_size];
    // Where the next call starts, and where this one ended.
    let pos_size = match position {
        Position::Bucket => 8,
        Position::Key => key_size.max(8),
    };
    let (mut at, mut next) = (
        vec![0u64; pos_size.div_ceil(8)],
        vec![0u64; pos_size.div_ceil(8)],
    );
    // Bounded: each call moves past at least one bucket or key, and a map has at most
    // 2^32.
    for call in 0..u64::from(u32::MAX) {
        let mut a = Attr::new();
        a.u64_at(0, if call == 0 { 0 } else { at.as_ptr() as u64 });
        a.u64_at(8, next.as_mut_ptr() as u64);
        a.u64_at(16, kbuf.as_mut_ptr() as u64);
        a.u64_at(24, vbuf.as_mut_ptr() as u64);
        a.u32_at(32, CHUNK as u32);
        a.u32_at(36, map.as_raw_fd() as u32);
        let done = match bpf(BPF_MAP_LOOKUP_BATCH, &mut a) {
            Ok(_) => false,
            // The end of the map (this call's entries, if any, are still copied).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = (u32::from_ne_bytes([a.0[32], a.0[33], a.0[34], a.0[35]]) as usize).min(CHUNK);
        keys.extend_from_slice(&kbuf[..n * key_size]);
        values.extend_from_slice(&vbuf[..n * value_size]);
        if done || n == 0 {
            break;
        }
        std::mem::swap(&mut at, &mut next);
    }
    Ok((keys, values))
}

/// Every entry of a hash map ([`map_entries`]).
pub fn hash_map_entries(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    map_entries(map, key_size, value_size, Position::Bucket)
}

/// Write `count` entries with `BPF_MAP_UPDATE_BATCH`: `keys` and `values` hold them
/// back to back (a per-CPU map's value: one 8-aligned value per possible CPU). On an
/// error, the entries before the one refused are written.
pub fn update_batch(
    map: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> io::Result<()> {
    let (ks, vs) = sizes(keys.len(), values.len(), count)?;
    for start in (0..count).step_by(CHUNK) {
        let n = CHUNK.min(count - start);
        let mut a = Attr::new();
        a.u64_at(16, keys[start * ks..].as_ptr() as u64);
        a.u64_at(24, values[start * vs..].as_ptr() as u64);
        a.u32_at(32, n as u32);
        a.u32_at(36, map.as_raw_fd() as u32);
        bpf(BPF_MAP_UPDATE_BATCH, &mut a)?;
    }
    Ok(())
}

/// Delete `count` keys (back to back in `keys`) with `BPF_MAP_DELETE_BATCH`. A key
/// that is not there is an error (`ENOENT`); the keys before it are deleted.
pub fn delete_batch(map: BorrowedFd<'_>, keys: &[u8], count: usize) -> io::Result<()> {
    let (ks, _) = sizes(keys.len(), 0, count)?;
    for start in (0..count).step_by(CHUNK) {
        let n = CHUNK.min(count - start);
        let mut a = Attr::new();
        a.u64_at(16, keys[start * ks..].as_ptr() as u64);
        a.u32_at(32, n as u32);
        a.u32_at(36, map.as_raw_fd() as u32);
        bpf(BPF_MAP_DELETE_BATCH, &mut a)?;
    }
    Ok(())
}

/// Bytes per key and per value of `count` entries held in buffers of these lengths.
fn sizes(keys: usize, values: usize, count: usize) -> io::Result<(usize, usize)> {
    if count == 0 {
        return Ok((0, 0));
    }
    if !keys.is_multiple_of(count) || !values.is_multiple_of(count) {
        return Err(io::Error::other("batch buffers are not whole entries"));
    }
    Ok((keys / count, values / count))
}
