//! Client TCP stacks, emulated with the real Linux TCP stack in a namespace of their
//! own. What tells them apart at the server is when they retransmit an unanswered SYN:
//!
//! | stack | SYNs at (s) | gives up | emulated by |
//! |---|---|---|---|
//! | Linux 6.x defaults | 0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67 | ~131 s | the namespace's defaults (`tcp_syn_linear_timeouts = 4`, `tcp_syn_retries = 6`) |
//! | older Linux | 0, 1, 3, 7, 15, 31, 63 | ~127 s | `tcp_syn_linear_timeouts = 0` |
//! | Windows | 0, 3, 9 | 21 s | a sock_ops program answering `BPF_SOCK_OPS_TIMEOUT_INIT` with 3 s, `tcp_syn_linear_timeouts = 0`, `tcp_syn_retries = 2` |
//! | macOS/iOS | 0, 1, 2, 3, 4, 5, 7, 11, 19, 35 | ~75 s | `tcp_syn_linear_timeouts = 4`, `tcp_syn_retries = 5` (the emulation gives up at ~67 s; no SYN is sent after 35 s in either) |
//!
//! The kernel's timer wheel adds its own lateness to every retransmission (a few ms on
//! the 1-s timers, up to ~0.5 s on the 32-s one at HZ=250), as it does for real clients.
//!
//! The Windows program is attached to a cgroup of its own (cgroup v2), which only the
//! Windows crowd's process joins, and it answers only for sockets of the Windows
//! namespace (by its netns cookie): nothing else on the machine sees it. It is a
//! dozen instructions, assembled here and loaded with the `bpf` system call.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::Netns;

/// A client TCP stack the storm generator can emulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stack {
    Linux,
    OldLinux,
    Windows,
    MacOs,
}

impl Stack {
    pub const ALL: [Stack; 4] = [Stack::Linux, Stack::OldLinux, Stack::Windows, Stack::MacOs];

    pub fn name(self) -> &'static str {
        match self {
            Stack::Linux => "linux",
            Stack::OldLinux => "old-linux",
            Stack::Windows => "windows",
            Stack::MacOs => "macos",
        }
    }

    /// Nominal SYN send times (s after the first) and when the stack gives up.
    pub fn schedule(self) -> (&'static [u64], u64) {
        match self {
            Stack::Linux => (&[0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67], 131),
            Stack::OldLinux => (&[0, 1, 3, 7, 15, 31, 63], 127),
            Stack::Windows => (&[0, 3, 9], 21),
            Stack::MacOs => (&[0, 1, 2, 3, 4, 5, 7, 11, 19, 35], 75),
        }
    }

    /// SYNs the stack sends in all.
    pub fn syns(self) -> usize {
        self.schedule().0.len()
    }

    /// The namespace sysctls that give the stack its schedule.
    fn sysctls(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Stack::Linux => &[
                ("net.ipv4.tcp_syn_linear_timeouts", "4"),
                ("net.ipv4.tcp_syn_retries", "6"),
            ],
            Stack::OldLinux => &[
                ("net.ipv4.tcp_syn_linear_timeouts", "0"),
                ("net.ipv4.tcp_syn_retries", "6"),
            ],
            Stack::Windows => &[
                ("net.ipv4.tcp_syn_linear_timeouts", "0"),
                ("net.ipv4.tcp_syn_retries", "2"),
            ],
            Stack::MacOs => &[
                ("net.ipv4.tcp_syn_linear_timeouts", "4"),
                ("net.ipv4.tcp_syn_retries", "5"),
            ],
        }
    }

    /// Give namespace `ns` this stack's schedule. For Windows, the returned guard holds
    /// the cgroup its crowd must join and the sock_ops program attached to it.
    pub fn emulate(self, ns: &Netns) -> Result<Option<InitialRto>> {
        for (k, v) in self.sysctls() {
            ns.sysctl(k, v)?;
        }
        match self {
            Stack::Windows => Ok(Some(InitialRto::attach(ns, 3_000)?)),
            _ => Ok(None),
        }
    }
}

/// A sock_ops program that sets the initial SYN timeout of one namespace's sockets,
/// attached to a cgroup of its own. Dropping it detaches the program (its link closes)
/// and removes the cgroup.
pub struct InitialRto {
    /// The cgroup a crowd process joins (its `cgroup.procs`) before it opens sockets.
    pub cgroup: PathBuf,
    _link: OwnedFd,
    _prog: OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_SOCK_OPS_TIMEOUT_INIT: i32 = 1;
const BPF_FUNC_GET_NETNS_COOKIE: i32 = 122;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// One eBPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0xf);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// The program: for `BPF_SOCK_OPS_TIMEOUT_INIT` in the namespace with `cookie`, reply
/// `jiffies`; anything else keeps the kernel's default.
fn program(cookie: u64, jiffies: i32) -> Vec<u8> {
    let code: Vec<[u8; 8]> = vec![
        insn(0xbf, 6, 1, 0, 0),                            // r6 = r1 (ctx)
        insn(0x61, 2, 6, 0, 0),                            // r2 = ctx->op
        insn(0x55, 2, 0, 7, BPF_SOCK_OPS_TIMEOUT_INIT),    // if r2 != TIMEOUT_INIT goto out
        insn(0xbf, 1, 6, 0, 0),                            // r1 = ctx
        insn(0x85, 0, 0, 0, BPF_FUNC_GET_NETNS_COOKIE),    // r0 = bpf_get_netns_cookie(ctx)
        insn(0x18, 1, 0, 0, cookie as u32 as i32),         // r1 = cookie (ld_imm64, low)
        insn(0x00, 0, 0, 0, (cookie >> 32) as u32 as i32), //   (high)
        insn(0x5d, 0, 1, 2, 0),                            // if r0 != r1 goto out
        insn(0xb7, 1, 0, 0, jiffies),                      // r1 = jiffies
        insn(0x63, 6, 1, 4, 0),                            // ctx->reply = r1
        insn(0xb7, 0, 0, 0, 1),                            // out: r0 = 1
        insn(0x95, 0, 0, 0, 0),                            // exit
    ];
    code.concat()
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; the kernel reads
    // and writes only within it, and pointers inside it outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The netns cookie of namespace `ns` (SO_NETNS_COOKIE of a socket made inside it).
fn netns_cookie(ns: &Netns) -> Result<u64> {
    ns.run_in(|| -> Result<u64> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let mut cookie: u64 = 0;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: a valid socket and an 8-byte buffer with its length.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE");
        }
        Ok(cookie)
    })?
}

/// Where cgroup v2 is mounted (hybrid hosts have it at `/sys/fs/cgroup/unified`).
fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        if let (Some(_), Some(dir), Some("cgroup2")) = (f.next(), f.next(), f.next()) {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("cgroup v2 is not mounted (needed to emulate Windows clients with a sock_ops program)")
}

impl InitialRto {
    /// Attach a program giving sockets of `ns` an initial SYN timeout of `ms`.
    pub fn attach(ns: &Netns, ms: u64) -> Result<InitialRto> {
        let jiffies = i32::try_from(
            ms * 1_000_000
                / shaper::clock::tick_ns().context("the coarse clock reports no resolution")?,
        )?;
        let cookie = netns_cookie(ns)?;
        let code = program(cookie, jiffies);
        let license = c"GPL";
        let mut log = vec![0u8; 4096];
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCK_OPS.to_ne_bytes());
        attr[4..8].copy_from_slice(&((code.len() / 8) as u32).to_ne_bytes());
        attr[8..16].copy_from_slice(&(code.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
        attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
        attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
        attr[48..60].copy_from_slice(b"shaper_tests");
        attr[68..72].copy_from_slice(&BPF_CGROUP_SOCK_OPS.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            format!(
                "loading the sock_ops program: {}",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        let cgroup = cgroup2_root()?.join(&ns.name);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let guard = CgroupDir(cgroup.clone());
        let dir = File::open(&cgroup)?;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_CGROUP_SOCK_OPS.to_ne_bytes());
        let link = bpf(BPF_LINK_CREATE, &mut attr).context("attaching the sock_ops program")?;
        std::mem::forget(guard);
        Ok(InitialRto {
            cgroup,
            _link: link,
            _prog: prog,
        })
    }
}

/// Removes a cgroup directory on drop (it must be empty of processes by then).
struct CgroupDir(PathBuf);

impl Drop for CgroupDir {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}

fn remove_cgroup(dir: &Path) {
    // A crowd process that just exited may take a moment to leave the cgroup.
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Drop for InitialRto {
    fn drop(&mut self) {
        remove_cgroup(&self.cgroup);
    }
}
