//! Programs of `cargo xtask bench flood`, never loaded by the daemon: an in-kernel SYN
//! generator and a bare `XDP_DROP`.
//!
//! The generator is a loop of frames between two veths. `flood_fan`, on the loop's
//! receiving end, broadcasts each frame it gets through the devmap `FAN`: one copy
//! back into the loop, every other copy to the veth whose peer is under test. On the
//! way out, `flood_src` (a devmap program) gives each copy a source of its own (one
//! /24, 65,536 /24s, or random IPv6 /64s) and fixes its checksums. A few frames
//! injected once keep the loop going until `FLOOD_CTL` says the budget of broadcasts
//! is spent: bounded, and a few million frames a second on one CPU, as
//! `BPF_PROG_TEST_RUN` live frames would give where the kernel allows them.
//!
//! `flood_drop` is a bare `XDP_DROP`: the cheapest an XDP filter can be.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::{Array, DevMap},
    programs::XdpContext,
};

/// Broadcast destinations: the loop's veth and copies of the target veth.
#[map]
static FAN: DevMap = DevMap::with_max_entries(64, 0);

/// `[0]`: broadcasts left; `[1]`: sources (0 = hosts of 10.1.1.0/24, 1 = one host in
/// each of the 65,536 /24s of 10.0.0.0/8, 2 = random /64s of 2001:db8::/32).
#[map]
static FLOOD_CTL: Array<u64> = Array::with_max_entries(2, 0);

/// `bpf_redirect_map` flags: to every entry of the map.
const BPF_F_BROADCAST: u64 = 1 << 3;

#[xdp]
pub fn flood_fan(_ctx: XdpContext) -> u32 {
    let Some(left) = FLOOD_CTL.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // One loop, one NAPI poll, one CPU: a plain decrement is exact.
    // SAFETY: a valid pointer into the map's value.
    unsafe {
        if *left == 0 {
            return xdp_action::XDP_DROP;
        }
        *left -= 1;
    }
    FAN.redirect(0, BPF_F_BROADCAST)
        .unwrap_or(xdp_action::XDP_DROP)
}

#[xdp(map = "devmap")]
pub fn flood_src(ctx: XdpContext) -> u32 {
    let sources = FLOOD_CTL.get(1).copied().unwrap_or(0);
    // SAFETY: a helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    if sources == 2 {
        // SAFETY: likewise.
        let r2 = unsafe { bpf_get_prandom_u32() };
        let _ = set_v6_net(&ctx, r, r2);
    } else {
        let [_, b, c, d] = r.to_be_bytes();
        let src = if sources == 1 {
            [10, b, c, 1]
        } else {
            [10, 1, 1, d]
        };
        let _ = set_v4_src(&ctx, u32::from_ne_bytes(src));
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn flood_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

const ETH_LEN: usize = 14;
/// Offsets in the frame of an IPv4 SYN (no options) and of an IPv6 one.
const V4_CSUM: usize = ETH_LEN + 10;
const V4_SRC: usize = ETH_LEN + 12;
const V4_TCP_CSUM: usize = ETH_LEN + 20 + 16;
const V6_SRC_NET: usize = ETH_LEN + 8;
const V6_TCP_CSUM: usize = ETH_LEN + 40 + 16;

/// A pointer to `size_of::<T>()` bytes at `off` of the frame, if it holds them.
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The checksum `csum` (as stored) after a 32-bit word of the data it covers changes
/// from `old` to `new` (as stored): RFC 1624, HC' = ~(~HC + ~m + m').
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!csum)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn set_v4_src(ctx: &XdpContext, new: u32) -> Option<()> {
    let src = at::<u32>(ctx, V4_SRC)?;
    let ip_csum = at::<u16>(ctx, V4_CSUM)?;
    let tcp_csum = at::<u16>(ctx, V4_TCP_CSUM)?;
    // SAFETY: each pointer is inside the frame (checked by `at`); unaligned access.
    unsafe {
        let old = src.read_unaligned();
        src.write_unaligned(new);
        ip_csum.write_unaligned(csum_replace4(ip_csum.read_unaligned(), old, new));
        tcp_csum.write_unaligned(csum_replace4(tcp_csum.read_unaligned(), old, new));
    }
    Some(())
}

#[inline(always)]
fn set_v6_net(ctx: &XdpContext, a: u32, b: u32) -> Option<()> {
    // Bytes 4..8 of the source (after 2001:db8:) and 8..12 are left: the /64 is
    // 2001:db8:aaaa:aaaa: from `a`, and `b` picks the host half's first word.
    let net = at::<u32>(ctx, V6_SRC_NET + 4)?;
    let host = at::<u32>(ctx, V6_SRC_NET + 8)?;
    let tcp_csum = at::<u16>(ctx, V6_TCP_CSUM)?;
    // SAFETY: inside the frame (checked by `at`); unaligned access.
    unsafe {
        let (old_net, old_host) = (net.read_unaligned(), host.read_unaligned());
        net.write_unaligned(a);
        host.write_unaligned(b);
        let c = csum_replace4(tcp_csum.read_unaligned(), old_net, a);
        tcp_csum.write_unaligned(csum_replace4(c, old_host, b));
    }
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: nothing here panics.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
