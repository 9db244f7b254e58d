//! Header walk: Ethernet, up to two VLAN tags, IPv4 (options) or IPv6 (extension
//! headers), then TCP. Returns a new-connection attempt or the reason to pass.
//!
//! Every read is bounds-checked against `data_end` right before it; offsets only grow by
//! header lengths taken from bounded fields, and loops have constant bounds.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use shaper_common::{
    Reason,
    maps::{WaitKey, family},
};

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags walked (QinQ: an outer 802.1ad tag and an inner 802.1Q tag).
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up (`ExtHdrLimit`).
const MAX_EXT_HEADERS: usize = 6;

const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The source of an attempt.
pub enum Source {
    V4(Addr<4>),
    V6(Addr<16>),
}

/// An address as it is on the wire. Aligned: the build allows misaligned loads and
/// stores, and the verifier refuses them on the stack, where addresses are copied.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Addr<const N: usize>(pub [u8; N]);

/// A new-connection attempt: TCP SYN without ACK. Holds what every attempt needs;
/// [`Attempt::wait_key`] reads the rest from the frame for the `defer` path.
pub struct Attempt {
    pub source: Source,
    pub dport: u16,
    layout: Layout,
}

impl Attempt {
    /// Fill `key` with the waiting line's key of this attempt and return its ISN (a
    /// retransmission repeats it), read from the frame: only `defer` needs them. On
    /// `Ok`, all 40 bytes of `key` are written.
    #[inline(always)]
    pub fn wait_key(&self, ctx: &XdpContext, key: *mut WaitKey) -> Result<u32, Reason> {
        // The IP header follows at most two VLAN tags; the bound is for the verifier,
        // which does not keep the offset's range across the call.
        let ip = self.layout.ip;
        if ip > ETH_HLEN + 4 * MAX_VLAN_TAGS {
            return Err(Reason::Malformed);
        }
        let h = at(ctx, self.layout.tcp, 20)?;
        let (v6, p) = if self.layout.v6 {
            (true, at(ctx, ip, 40)?)
        } else {
            (false, at(ctx, ip, 20)?)
        };
        // SAFETY: `key` is valid for writes of a WaitKey (8-aligned, 40 bytes); `at`
        // checked every frame range read. Five word stores clear it: the compiler
        // would zero byte arrays with a call to a byte-at-a-time `memset`.
        unsafe {
            let words = key.cast::<u64>();
            let mut i = 0;
            while i < size_of::<WaitKey>() / 8 {
                words.add(i).write_volatile(0);
                i += 1;
            }
            let k = &mut *key;
            k.sport = be16(h);
            k.dport = self.dport;
            if v6 {
                k.family = family::V6;
                copy_bytes::<16>(p + 8, &mut k.src);
                copy_bytes::<16>(p + 24, &mut k.dst);
            } else {
                k.family = family::V4;
                copy_bytes::<4>(p + 12, &mut k.src);
                copy_bytes::<4>(p + 16, &mut k.dst);
            }
        }
        // SAFETY: `at` checked 20 bytes at `h`.
        Ok(u32::from_be_bytes(unsafe { read::<[u8; 4]>(h + 4) }))
    }
}

/// Copy `N` (≤ 16) bytes at `src` into the front of `dst`, one byte after the other:
/// volatile reads keep the compiler from loading all sixteen first and spilling them
/// (the stack is the program's scarcest resource).
///
/// # Safety
/// `src` must be an address that [`at`] checked covers `N` bytes of the frame.
#[inline(always)]
unsafe fn copy_bytes<const N: usize>(src: usize, dst: &mut [u8; 16]) {
    let mut i = 0;
    while i < N && i < 16 {
        // SAFETY: the caller guarantees `src` covers N bytes.
        dst[i] = unsafe { core::ptr::read_volatile((src + i) as *const u8) };
        i += 1;
    }
}

/// Address of `len` bytes at `off`, if they are all inside the frame.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Result<usize, Reason> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return Err(Reason::Truncated);
    }
    Ok(start + off)
}

/// Read a `T` (plain bytes: any bit pattern is a value) at `addr`.
///
/// # Safety
/// `addr` must be an address that [`at`] checked covers `size_of::<T>()` bytes of the
/// frame.
#[inline(always)]
unsafe fn read<T: Copy>(addr: usize) -> T {
    // SAFETY: the caller guarantees the bytes are in the frame.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// A big-endian 16-bit field at `addr`.
///
/// # Safety
/// As for [`read`]: `addr` checked by [`at`] for two bytes.
#[inline(always)]
unsafe fn be16(addr: usize) -> u16 {
    // SAFETY: the caller's guarantee.
    u16::from_be_bytes(unsafe { read::<[u8; 2]>(addr) })
}

/// Where the headers of a TCP segment are.
#[derive(Clone, Copy)]
struct Layout {
    /// Offset of the IP header.
    ip: usize,
    /// Offset of the TCP header.
    tcp: usize,
    v6: bool,
}

/// Parse the frame; `Ok` only for a new-connection attempt.
#[inline(always)]
pub fn attempt(ctx: &XdpContext) -> Result<Attempt, Reason> {
    let layout = match common(ctx)? {
        COMMON_V4_TCP => Layout {
            ip: ETH_HLEN,
            tcp: COMMON_V4_TCP,
            v6: false,
        },
        COMMON_V6_TCP => Layout {
            ip: ETH_HLEN,
            tcp: COMMON_V6_TCP,
            v6: true,
        },
        _ => walk(ctx)?,
    };
    tcp(ctx, layout)
}

/// Where [`common`] finds TCP: after an untagged IPv4 header without options, or an
/// untagged IPv6 header.
const COMMON_V4_TCP: usize = ETH_HLEN + 20;
const COMMON_V6_TCP: usize = ETH_HLEN + 40;

/// The layouts nearly all traffic has: untagged IPv4 without options, or untagged IPv6
/// with TCP right after the fixed header. Fixed offsets, the same answers as [`walk`]
/// and [`tcp`] give for these frames; a segment that is no attempt (established
/// traffic) is answered here. `Ok(offset of TCP)` for an attempt, or `Ok(0)` for any
/// other frame.
#[inline(always)]
fn common(ctx: &XdpContext) -> Result<usize, Reason> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + COMMON_V4_TCP + 20 > end {
        return Ok(0);
    }
    // Ethertype, version and IHL, TOS: one load (the build allows misaligned loads).
    // SAFETY (this and the reads below): the frame holds COMMON_V4_TCP + 20 bytes,
    // checked above; the IPv6 read is after its own check.
    let head = u32::from_le_bytes(unsafe { read(start + 12) });
    if head & 0x00ff_ffff == 0x0045_0008 {
        // Flags and fragment offset, TTL, protocol.
        // SAFETY: as above.
        let w = u32::from_le_bytes(unsafe { read(start + ETH_HLEN + 6) });
        if w & 0xff00_ff1f != 0x0600_0000 {
            return Err(if w & 0xff1f != 0 {
                Reason::Fragment
            } else {
                Reason::NotTcp
            });
        }
        return segment(start + COMMON_V4_TCP, COMMON_V4_TCP);
    }
    if head & 0x00f0_ffff == 0x0060_dd86
        && start + COMMON_V6_TCP + 20 <= end
        // SAFETY: as above.
        && unsafe { read::<u8>(start + ETH_HLEN + 6) } == IPPROTO_TCP
    {
        return segment(start + COMMON_V6_TCP, COMMON_V6_TCP);
    }
    Ok(0)
}

/// [`tcp`]'s checks on a TCP header at `h` (checked by the caller for 20 bytes), `off`
/// into the frame: `Ok(off)` for an attempt.
#[inline(always)]
fn segment(h: usize, off: usize) -> Result<usize, Reason> {
    // SAFETY: the caller checked 20 bytes at `h`.
    let [doff, flags]: [u8; 2] = unsafe { read(h + 12) };
    if doff >> 4 < 5 {
        return Err(Reason::Malformed);
    }
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Err(Reason::NotAttempt);
    }
    Ok(off)
}

/// The general walk: VLAN tags, IPv4 options, IPv6 extension headers.
#[inline(always)]
fn walk(ctx: &XdpContext) -> Result<Layout, Reason> {
    // SAFETY (both reads of the loop too): each address is `at`'s, for two bytes.
    let mut ethertype = unsafe { be16(at(ctx, 12, 2)?) };
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes), then the encapsulated ethertype.
        // SAFETY: as above.
        ethertype = unsafe { be16(at(ctx, off + 2, 2)?) };
        off += 4;
        tags += 1;
    }
    match ethertype {
        ETH_P_IPV4 => ipv4(ctx, off),
        ETH_P_IPV6 => ipv6(ctx, off),
        _ => Err(Reason::NotIp),
    }
}

/// IPv4 at `off`: where its TCP header starts.
#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<Layout, Reason> {
    let h = at(ctx, off, 20)?;
    // SAFETY (every read of this function): `at` checked 20 bytes at `h`.
    let ver_ihl: u8 = unsafe { read(h) };
    if ver_ihl >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    // IHL is 4 bits: the header is 20..=60 bytes.
    let ihl = usize::from(ver_ihl & 0x0f);
    if ihl < 5 {
        return Err(Reason::Malformed);
    }
    // SAFETY: as above.
    if unsafe { be16(h + 6) } & 0x1fff != 0 {
        // Non-first fragment: no TCP header here.
        return Err(Reason::Fragment);
    }
    // SAFETY: as above.
    if unsafe { read::<u8>(h + 9) } != IPPROTO_TCP {
        return Err(Reason::NotTcp);
    }
    // The options (if any) must be in the frame too; `tcp` checks past them.
    at(ctx, off, ihl * 4)?;
    Ok(Layout {
        ip: off,
        tcp: off + ihl * 4,
        v6: false,
    })
}

/// IPv6 at `off`: walks extension headers to a fixed bound to the TCP header.
#[inline(always)]
fn ipv6(ctx: &XdpContext, ip: usize) -> Result<Layout, Reason> {
    let h = at(ctx, ip, 40)?;
    // SAFETY (this and the next): `at` checked 40 bytes at `h`; each extension
    // header's reads below are within what `at` checked at `e`.
    if unsafe { read::<u8>(h) } >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    // SAFETY: as above.
    let mut next: u8 = unsafe { read(h + 6) };
    let mut off = ip + 40;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => {
                return Ok(Layout {
                    ip,
                    tcp: off,
                    v6: true,
                });
            }
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e = at(ctx, off, 2)?;
                // SAFETY: two bytes at `e`, checked.
                let [nh, len]: [u8; 2] = unsafe { read(e) };
                next = nh;
                // Length in 8-byte units, not counting the first 8 bytes.
                off += (usize::from(len) + 1) * 8;
            }
            IPV6_AH => {
                let e = at(ctx, off, 2)?;
                // SAFETY: two bytes at `e`, checked.
                let [nh, len]: [u8; 2] = unsafe { read(e) };
                next = nh;
                // Length in 4-byte units, minus 2.
                off += (usize::from(len) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = at(ctx, off, 8)?;
                // SAFETY: eight bytes at `e`, checked.
                let (nh, frag) = unsafe { (read::<u8>(e), be16(e + 2)) };
                next = nh;
                if frag >> 3 != 0 {
                    return Err(Reason::Fragment);
                }
                off += 8;
            }
            _ => return Err(Reason::NotTcp),
        }
        walked += 1;
    }
    match next {
        IPPROTO_TCP => Ok(Layout {
            ip,
            tcp: off,
            v6: true,
        }),
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
            Err(Reason::ExtHdrLimit)
        }
        _ => Err(Reason::NotTcp),
    }
}

/// TCP: an attempt is SYN without ACK, whatever the other flags. The addresses are
/// read only for attempts; the rest of the traffic never needs them.
#[inline(always)]
fn tcp(ctx: &XdpContext, layout: Layout) -> Result<Attempt, Reason> {
    let h = at(ctx, layout.tcp, 20)?;
    // SAFETY (every read of this function): `at` checked 20 bytes at `h`, and the
    // addresses' reads are at offsets `at` checked in the IP header.
    let [doff, flags]: [u8; 2] = unsafe { read(h + 12) };
    if doff >> 4 < 5 {
        return Err(Reason::Malformed);
    }
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Err(Reason::NotAttempt);
    }
    let source = if layout.v6 {
        // SAFETY: as above (16 bytes at 8 of a checked 40).
        Source::V6(Addr(unsafe { read(at(ctx, layout.ip, 40)? + 8) }))
    } else {
        // SAFETY: as above (4 bytes at 12 of a checked 20).
        Source::V4(Addr(unsafe { read(at(ctx, layout.ip, 20)? + 12) }))
    };
    Ok(Attempt {
        source,
        // SAFETY: as above.
        dport: unsafe { be16(h + 2) },
        layout,
    })
}
