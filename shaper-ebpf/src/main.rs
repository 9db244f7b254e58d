//! shaper's XDP program: parse → classify → look up the rule → police → count.
//!
//! Every exit path bumps one per-CPU counter for its [`Reason`]; only a policer verdict
//! drops, and anything the parser does not understand passes (and is counted).
#![no_std]
#![no_main]
// `atomic_cxchg`: core::sync::atomic has no compare-exchange on the BPF target, the
// intrinsic lowers to BPF_CMPXCHG (see budget.rs).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics is the only cmpxchg on BPF"
)]

mod budget;
mod clock;
mod defer;
mod maps;
mod parse;
mod police;
mod stats;
mod table;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use shaper_common::Reason;

/// The build's number, which the loader may set (`EbpfLoader::set_global`): two loads
/// with different numbers are two different programs (the upgrade tests swap them).
#[unsafe(no_mangle)]
static SHAPER_BUILD: u32 = 1;

#[xdp]
pub fn shaper(ctx: XdpContext) -> u32 {
    let reason = match parse::attempt(&ctx) {
        Ok(attempt) => {
            // SAFETY: a read of the program's own read-only global (kept by the read).
            let _build = unsafe { core::ptr::read_volatile(&raw const SHAPER_BUILD) };
            police::police(&ctx, &attempt)
        }
        // Established traffic, nearly every packet: its own short exit.
        Err(Reason::NotAttempt) => {
            stats::count(Reason::NotAttempt);
            return xdp_action::XDP_PASS;
        }
        Err(reason) => reason,
    };
    stats::count(reason);
    match reason {
        Reason::Dropped | Reason::Contended | Reason::Deferred | Reason::QueueFull => {
            xdp_action::XDP_DROP
        }
        _ => xdp_action::XDP_PASS,
    }
}

/// A bare `XDP_PASS`: the baseline that `cargo xtask bench prog` measures against.
#[xdp]
pub fn shaper_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the program has no panicking paths (the verifier would reject the
    // loop below if it were ever linked in a reachable place).
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
