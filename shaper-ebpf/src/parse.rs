//! Header walk: Ethernet, up to two VLAN tags, IPv4 (options) or IPv6 (extension
//! headers), then TCP. Returns a new-connection attempt or the reason to pass.
//!
//! Every read is bounds-checked against `data_end` right before it; offsets only grow by
//! header lengths taken from bounded fields, and loops have constant bounds.

use aya_ebpf::programs::XdpContext;
use shaper_common::Reason;

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
    V4([u8; 4]),
    V6([u8; 16]),
}

/// A new-connection attempt: TCP SYN without ACK.
pub struct Attempt {
    pub source: Source,
    /// Destination address (IPv4 in the first four bytes).
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The SYN's sequence number (the client's ISN): a retransmission repeats it.
    pub isn: u32,
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

/// Read a `T` at an address checked by [`at`].
#[inline(always)]
fn read<T: Copy>(addr: usize) -> T {
    // SAFETY: callers pass an address that `at` checked covers size_of::<T>() bytes.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

#[inline(always)]
fn be16(addr: usize) -> u16 {
    u16::from_be_bytes(read::<[u8; 2]>(addr))
}

/// Parse the frame; `Ok` only for a new-connection attempt.
#[inline(always)]
pub fn attempt(ctx: &XdpContext) -> Result<Attempt, Reason> {
    let mut ethertype = be16(at(ctx, 12, 2)?);
    let mut off = ETH_HLEN;
    let mut tags = 0;
    while tags < MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        // TCI (2 bytes), then the encapsulated ethertype.
        ethertype = be16(at(ctx, off + 2, 2)?);
        off += 4;
        tags += 1;
    }
    let (l4, source, dst) = match ethertype {
        ETH_P_IPV4 => ipv4(ctx, off)?,
        ETH_P_IPV6 => ipv6(ctx, off)?,
        _ => return Err(Reason::NotIp),
    };
    tcp(ctx, l4, source, dst)
}

/// IPv4: returns the TCP header's offset, the source and the destination.
#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize) -> Result<(usize, Source, [u8; 16]), Reason> {
    let h = at(ctx, off, 20)?;
    let ver_ihl: u8 = read(h);
    if ver_ihl >> 4 != 4 {
        return Err(Reason::Malformed);
    }
    // IHL is 4 bits: the header is 20..=60 bytes.
    let ihl = usize::from(ver_ihl & 0x0f);
    if ihl < 5 {
        return Err(Reason::Malformed);
    }
    if be16(h + 6) & 0x1fff != 0 {
        // Non-first fragment: no TCP header here.
        return Err(Reason::Fragment);
    }
    if read::<u8>(h + 9) != IPPROTO_TCP {
        return Err(Reason::NotTcp);
    }
    let src: [u8; 4] = read(h + 12);
    let [d0, d1, d2, d3]: [u8; 4] = read(h + 16);
    let dst = [d0, d1, d2, d3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // The options (if any) must be in the frame too; `tcp` checks past them.
    at(ctx, off, ihl * 4)?;
    Ok((off + ihl * 4, Source::V4(src), dst))
}

/// IPv6: walks extension headers to a fixed bound; returns the TCP header's offset.
#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize) -> Result<(usize, Source, [u8; 16]), Reason> {
    let h = at(ctx, off, 40)?;
    if read::<u8>(h) >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    let mut next: u8 = read(h + 6);
    let src: [u8; 16] = read(h + 8);
    let dst: [u8; 16] = read(h + 24);
    let mut off = off + 40;
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Ok((off, Source::V6(src), dst)),
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let e = at(ctx, off, 2)?;
                next = read(e);
                // Length in 8-byte units, not counting the first 8 bytes.
                off += (usize::from(read::<u8>(e + 1)) + 1) * 8;
            }
            IPV6_AH => {
                let e = at(ctx, off, 2)?;
                next = read(e);
                // Length in 4-byte units, minus 2.
                off += (usize::from(read::<u8>(e + 1)) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let e = at(ctx, off, 8)?;
                next = read(e);
                if be16(e + 2) >> 3 != 0 {
                    return Err(Reason::Fragment);
                }
                off += 8;
            }
            _ => return Err(Reason::NotTcp),
        }
        walked += 1;
    }
    match next {
        IPPROTO_TCP => Ok((off, Source::V6(src), dst)),
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AH | IPV6_FRAGMENT => {
            Err(Reason::ExtHdrLimit)
        }
        _ => Err(Reason::NotTcp),
    }
}

/// TCP: an attempt is SYN without ACK, whatever the other flags.
#[inline(always)]
fn tcp(ctx: &XdpContext, off: usize, source: Source, dst: [u8; 16]) -> Result<Attempt, Reason> {
    let h = at(ctx, off, 20)?;
    if read::<u8>(h + 12) >> 4 < 5 {
        return Err(Reason::Malformed);
    }
    let flags: u8 = read(h + 13);
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return Err(Reason::NotAttempt);
    }
    Ok(Attempt {
        source,
        dst,
        sport: be16(h),
        dport: be16(h + 2),
        isn: u32::from_be_bytes(read::<[u8; 4]>(h + 4)),
    })
}
