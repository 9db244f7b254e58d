//! Attaching the program to interfaces, with an explicit, logged fallback.

use anyhow::{Result, anyhow};
use aya::programs::{Xdp, XdpMode, xdp::XdpLinkId};

/// How to attach, as the operator asks for it (`--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Native (driver) mode if the driver supports it, else generic (skb) mode.
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode: works on any interface, slower.
    Skb,
}

/// The mode actually in use on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Native,
    Skb,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Attached::Native => "native",
            Attached::Skb => "skb",
        })
    }
}

/// Attach `prog` to `iface` in `mode`.
pub fn attach(prog: &mut Xdp, iface: &str, mode: Mode) -> Result<(XdpLinkId, Attached)> {
    let native = |prog: &mut Xdp| prog.attach(iface, XdpMode::Driver);
    let skb = |prog: &mut Xdp| prog.attach(iface, XdpMode::Skb);
    match mode {
        Mode::Native => native(prog).map(|l| (l, Attached::Native)).map_err(|e| {
            anyhow!(
                "attaching to {iface} in native mode failed: {e}; the driver may not \
                 support XDP: try --mode skb (or --mode auto)"
            )
        }),
        Mode::Skb => skb(prog).map(|l| (l, Attached::Skb)).map_err(|e| {
            anyhow!(
                "attaching to {iface} in skb mode failed: {e}; check the interface exists \
                 and no other XDP program is attached (`ip link show {iface}`)"
            )
        }),
        Mode::Auto => match native(prog) {
            Ok(l) => Ok((l, Attached::Native)),
            Err(native_err) => {
                tracing::warn!(
                    iface,
                    error = %native_err,
                    "native XDP attach failed; falling back to skb (generic) mode"
                );
                skb(prog).map(|l| (l, Attached::Skb)).map_err(|e| {
                    anyhow!(
                        "attaching to {iface} failed in native mode ({native_err}) and in skb \
                         mode ({e}); check the interface exists and no other XDP program is \
                         attached (`ip link show {iface}`)"
                    )
                })
            }
        },
    }
}
