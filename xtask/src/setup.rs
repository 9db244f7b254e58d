//! `cargo xtask setup`: install what a fresh machine lacks.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// The nightly the eBPF crate is built and tested with (build-std for the BPF target;
/// aya 0.15+ would need rustc 1.98, which no toolchain here has).
const NIGHTLY: &str = "1.97.0-nightly";
const NIGHTLY_DATE: &str = "2026-05-19";
const BPF_LINKER: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "nftables",
    "iptables",
    "ethtool",
    // The unit file's check: `systemd-analyze verify`, which asks `man` for its page.
    "systemd",
    "man-db",
    // `promtool check metrics` on a scrape of /metrics (and the Prometheus server).
    "prometheus",
    // The font of the demo's dashboard picture.
    "fonts-dejavu-core",
    // A terminal for the live `shaper top` test.
    "tmux",
];

pub fn setup() -> Result<()> {
    nightly()?;
    packages()?;
    bpf_linker()?;
    python()?;
    Ok(())
}

/// Python tools from PyPI, pinned: the Kubernetes schema validator (offline: it carries
/// the schemas) that checks deploy/kubernetes/.
const PYTHON: &[(&str, &str)] = &[("kubernetes-validate", "kubernetes-validate==1.31.0")];

fn python() -> Result<()> {
    for (cmd, pkg) in PYTHON {
        if output(cmd, &["--version"]).is_some() {
            continue;
        }
        run(
            Command::new("python3").args(["-m", "pip", "install", "-q", pkg]),
            &format!("installing {pkg} (PyPI)"),
        )?;
    }
    Ok(())
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn nightly() -> Result<()> {
    let Some(v) = output("rustc", &["+nightly", "--version"]) else {
        bail!(
            "no nightly toolchain: the XDP program needs rustc {NIGHTLY} ({NIGHTLY_DATE}); \
             install it with `rustup toolchain install nightly-{NIGHTLY_DATE}` and make it \
             the `nightly` toolchain"
        );
    };
    if !(v.contains(NIGHTLY) && v.contains(NIGHTLY_DATE)) {
        eprintln!(
            "setup: warning: nightly is `{}`; the project is tested with {NIGHTLY} \
             ({NIGHTLY_DATE}); a different nightly may fail to build or verify",
            v.trim()
        );
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "adding rust-src to nightly (build-std for the BPF target)",
        )?;
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", pkg])
        .is_some_and(|s| s.contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output("dpkg-query", &["--version"]).is_none() {
        bail!(
            "not a Debian-like system: install these by hand: {}",
            missing.join(" ")
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "missing packages: {}; run as root, or: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("installing {}", missing.join(" ")),
    )
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER)) {
        return Ok(());
    }
    // bpf-linker links libLLVM; point it at Debian's LLVM 22, not an older llvm-config
    // that may be first on PATH.
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
        "installing bpf-linker 0.13 for LLVM 22 (about a minute)",
    )
}
