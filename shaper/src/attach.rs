//! Attaching the program to interfaces, with an explicit, logged fallback.

use std::{os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::Xdp;

use crate::{bpfsys, netlink, pins};

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

/// The program on an interface, as attached or adopted.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub iface: String,
    /// The mode in use (`None` when adopted and the kernel does not say).
    pub mode: Option<Attached>,
    pub prog_id: u32,
    pub link_id: u32,
    /// The link was pinned by an earlier daemon and its program replaced atomically.
    pub adopted: bool,
}

/// Attach `prog` to `iface` through a pinned BPF link in `dir`, or, if `dir` holds a live
/// link already (an earlier daemon, even one killed with SIGKILL), replace that link's
/// program atomically: no second attachment and no moment without a program.
///
/// Another tool's XDP program on the interface is refused with its id, unless
/// `replace_foreign`.
pub fn attach_pinned(
    prog: &Xdp,
    iface: &str,
    mode: Mode,
    dir: &Path,
    replace_foreign: bool,
) -> Result<Attachment> {
    let prog_fd = prog.fd().context("the program is not loaded")?;
    let prog_fd = prog_fd.as_fd();
    let prog_id = prog.info().context("reading the program's id")?.id();
    let pin = dir.join(pins::LINK);
    if pin.exists() {
        let link = bpfsys::obj_get(&pin)
            .with_context(|| format!("opening the pinned link {}", pin.display()))?;
        let info = bpfsys::xdp_link_info(link.as_fd())?;
        if info.ifindex != 0 {
            bpfsys::link_update(link.as_fd(), prog_fd)
                .with_context(|| format!("replacing the program on {iface}'s pinned link"))?;
            return Ok(Attachment {
                iface: iface.to_string(),
                mode: kernel_mode(iface),
                prog_id,
                link_id: info.link_id,
                adopted: true,
            });
        }
        // The interface went away: the link is defunct. Start again.
        tracing::warn!(iface, link = %pin.display(), "pinned link is defunct (interface gone); replacing it");
        std::fs::remove_file(&pin)?;
    }
    let ifindex = ifindex(iface)?;
    let create = |flags: u32| bpfsys::xdp_link_create(prog_fd, ifindex, flags);
    let try_mode = |m: Attached| -> std::io::Result<std::os::fd::OwnedFd> {
        match create(m.flags()) {
            Err(e) if foreign(&e) && replace_foreign => {
                let other = foreign_program(ifindex);
                tracing::warn!(iface, other = %other, "--replace: detaching another XDP program");
                remove_foreign(iface, ifindex);
                create(m.flags())
            }
            r => r,
        }
    };
    let busy = foreign;
    let refuse = |e: std::io::Error| -> anyhow::Error {
        if busy(&e) {
            anyhow!(
                "{iface} already has an XDP program ({}) that shaper did not attach; refusing to replace it. Detach it first, or pass --replace to take the interface over",
                foreign_program(ifindex)
            )
        } else {
            anyhow!("attaching to {iface}: {e}")
        }
    };
    let (link, used) = match mode {
        Mode::Native => (
            try_mode(Attached::Native).map_err(|e| {
                if busy(&e) {
                    refuse(e)
                } else {
                    anyhow!(
                        "attaching to {iface} in native mode failed: {e}; the driver may not support XDP: try --mode skb (or --mode auto)"
                    )
                }
            })?,
            Attached::Native,
        ),
        Mode::Skb => (try_mode(Attached::Skb).map_err(refuse)?, Attached::Skb),
        Mode::Auto => match try_mode(Attached::Native) {
            Ok(l) => (l, Attached::Native),
            Err(e) if busy(&e) => return Err(refuse(e)),
            Err(native_err) => {
                tracing::warn!(
                    iface,
                    error = %native_err,
                    "native XDP attach failed; falling back to skb (generic) mode"
                );
                (
                    try_mode(Attached::Skb).map_err(|e| {
                        anyhow!(
                            "attaching to {iface} failed in native mode ({native_err}) and in skb mode ({e})"
                        )
                    })?,
                    Attached::Skb,
                )
            }
        },
    };
    bpfsys::obj_pin(link.as_fd(), &pin)
        .with_context(|| format!("pinning the link at {}", pin.display()))?;
    let info = bpfsys::xdp_link_info(link.as_fd())?;
    Ok(Attachment {
        iface: iface.to_string(),
        mode: Some(used),
        prog_id,
        link_id: info.link_id,
        adopted: false,
    })
}

/// The kernel's answer when another program is attached without a link: EBUSY, or
/// EEXIST when asking for native mode over a generic-mode program.
fn foreign(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EEXIST))
}

impl Attached {
    fn flags(self) -> u32 {
        match self {
            Attached::Native => bpfsys::XDP_FLAGS_DRV_MODE,
            Attached::Skb => bpfsys::XDP_FLAGS_SKB_MODE,
        }
    }
}

/// The index of interface `iface`.
pub fn ifindex(iface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(iface)?;
    // SAFETY: a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface named {iface} (see `ip link`)"),
        i => Ok(i),
    }
}

/// What the kernel runs on `iface` (one netlink request): the XDP program's id and
/// mode; `None` if nothing, or if it cannot be asked.
pub fn kernel_xdp(iface: &str) -> Option<netlink::XdpState> {
    netlink::xdp(ifindex(iface).ok()?).ok().flatten()
}

/// The mode the kernel reports for the XDP program on `iface` (over netlink).
pub fn kernel_mode(iface: &str) -> Option<Attached> {
    kernel_xdp(iface).and_then(|x| x.mode)
}

impl Attachment {
    /// The mode in use as the log, `status` and the metrics say it: the one attached
    /// with, else the one the kernel reports (`kernel`, asked only then), else
    /// `unknown`.
    pub fn mode_name(&self, kernel: impl FnOnce() -> Option<Attached>) -> String {
        self.mode
            .or_else(kernel)
            .map_or("unknown".to_string(), |m| m.to_string())
    }
}

/// A description of the XDP program another tool attached (its id, from the kernel).
fn foreign_program(ifindex: u32) -> String {
    match netlink::xdp(ifindex) {
        Ok(Some(x)) if x.prog_id != 0 => format!("program id {}", x.prog_id),
        _ => "id unknown".to_string(),
    }
}

fn remove_foreign(iface: &str, ifindex: u32) {
    // Attached through a link (another tool holding it): detach the link. Links are
    // found by id across the whole host and say only their ifindex, which every network
    // namespace numbers on its own: the link must also run the program this
    // namespace's interface reports, or another namespace's interface would lose its
    // program.
    let prog_id = netlink::xdp(ifindex)
        .ok()
        .flatten()
        .map_or(0, |x| x.prog_id);
    if prog_id != 0 {
        match bpfsys::detach_xdp_links(ifindex, prog_id) {
            Ok(n) if n > 0 => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(iface, error = %e, "detaching another tool's XDP link"),
        }
    }
    // Attached through netlink: switch it off.
    netlink::detach(ifindex);
}
