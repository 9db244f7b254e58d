//! `cargo xtask package [--static] [--check]`: the Debian package, built with
//! cargo-deb from what this stages in target/package/: the binary (static with
//! `--static`, musl), the systemd unit (running /usr/bin/shaper), a man page per
//! command, shell completions. `--check` installs the package into a fresh Debian 12
//! root (debootstrap, then `dpkg -i` in a chroot), runs the binary there, checks the
//! package's file list and conffiles, boots that root's systemd in a container to run
//! the installed unit (tests/tests/systemd.rs), and runs the daemon tests that load,
//! attach and enforce with the packaged binary.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, setup::run, workspace_root};

/// The cargo-deb release the package is built with.
const CARGO_DEB: &str = "3.6.0";
const MUSL: &str = "x86_64-unknown-linux-musl";

/// What the package must hold (paths in it; cargo-deb compresses man pages).
const CONTENTS: &[&str] = &[
    "usr/bin/shaper",
    "lib/systemd/system/shaper.service",
    "etc/shaper/shaper.toml",
    "etc/default/shaper",
    "usr/share/man/man1/shaper.1.gz",
    "usr/share/man/man1/shaper-run.1.gz",
    "usr/share/bash-completion/completions/shaper",
    "usr/share/zsh/vendor-completions/_shaper",
    "usr/share/fish/vendor_completions.d/shaper.fish",
    "usr/share/doc/shaper/README.md",
    "usr/share/doc/shaper/operations.md",
    "usr/share/doc/shaper/grafana/shaper.json",
];

pub fn package(static_binary: bool, check: bool) -> Result<()> {
    let root = workspace_root();
    let out = root.join("target/package");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("man"))?;
    std::fs::create_dir_all(out.join("completions"))?;
    let built = if static_binary {
        if !run_ok(
            Command::new("rustup").args(["target", "list", "--installed"]),
            MUSL,
        ) {
            run(
                Command::new("rustup").args(["target", "add", MUSL]),
                "adding the musl target",
            )?;
        }
        cargo(&["build", "--release", "-p", "shaper", "--target", MUSL])?;
        root.join("target").join(MUSL).join("release/shaper")
    } else {
        cargo(&["build", "--release", "-p", "shaper"])?;
        root.join("target/release/shaper")
    };
    let bin = out.join("shaper");
    std::fs::copy(&built, &bin).with_context(|| built.display().to_string())?;
    run(Command::new("strip").arg(&bin), "strip")?;
    // The unit runs the packaged binary.
    let unit = std::fs::read_to_string(root.join("packaging/shaper.service"))?
        .replace("/usr/local/bin/shaper", "/usr/bin/shaper");
    std::fs::write(out.join("shaper.service"), unit)?;
    run(
        Command::new(&bin)
            .args(["man", "--dir"])
            .arg(out.join("man")),
        "man pages",
    )?;
    for (shell, file) in [
        ("bash", "shaper.bash"),
        ("zsh", "_shaper"),
        ("fish", "shaper.fish"),
    ] {
        let o = Command::new(&bin).args(["completions", shell]).output()?;
        if !o.status.success() {
            bail!("shaper completions {shell} failed");
        }
        std::fs::write(out.join("completions").join(file), o.stdout)?;
    }
    if Command::new("cargo-deb").arg("--version").output().is_err() {
        run(
            Command::new("cargo").args([
                "install",
                "--locked",
                "cargo-deb",
                "--version",
                CARGO_DEB,
            ]),
            "installing cargo-deb",
        )?;
    }
    let o = Command::new("cargo-deb")
        .args(["-p", "shaper", "--no-build", "--no-strip", "--output"])
        .arg(&out)
        .current_dir(&root)
        .output()
        .context("cargo-deb")?;
    if !o.status.success() {
        bail!("cargo-deb: {}", String::from_utf8_lossy(&o.stderr));
    }
    let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} binary: {} ({:.1} MiB, stripped)",
        if static_binary {
            "static (musl)"
        } else {
            "glibc"
        },
        bin.display(),
        size(&bin) as f64 / f64::from(1 << 20)
    );
    println!(
        "package: {} ({:.1} MiB)",
        deb.display(),
        size(&deb) as f64 / f64::from(1 << 20)
    );
    let listing = capture(Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    let missing: Vec<&str> = CONTENTS
        .iter()
        .copied()
        .filter(|p| {
            !listing
                .lines()
                .any(|l| l.ends_with(&format!(" {p}")) || l.ends_with(&format!("/{p}")))
        })
        .collect();
    if !missing.is_empty() {
        bail!("the package lacks {}", missing.join(", "));
    }
    if check {
        install_check(&deb)?;
        // The packaged binary itself loads, attaches and enforces (in a testbed of
        // network namespaces), also under the unit's capabilities.
        tests(
            "daemon",
            &[
                "counters_agree_with_nftables_packet_for_packet",
                "the_daemon_enforces_with_only_the_units_capabilities",
            ],
            ("SHAPER_BIN", &bin),
        )?;
    }
    Ok(())
}

/// Install `deb` into a fresh Debian 12 root and run it there.
fn install_check(deb: &Path) -> Result<()> {
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "debootstrap"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "installing debootstrap",
        )?;
    }
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "systemd-container"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "installing systemd-container",
        )?;
    }
    let chroot = std::env::temp_dir().join(format!("shaper-deb12-{}", std::process::id()));
    let _guard = Remove(chroot.clone());
    // With systemd, so that the root also boots (the unit's test below).
    run(
        Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,iproute2",
                "bookworm",
            ])
            .arg(&chroot)
            .arg("http://deb.debian.org/debian"),
        "debootstrap of Debian 12 (about a minute)",
    )?;
    std::fs::copy(deb, chroot.join("tmp/shaper.deb"))?;
    let inside = |args: &[&str]| -> Result<String> {
        capture(Command::new("chroot").arg(&chroot).args(args))
    };
    inside(&["dpkg", "-i", "/tmp/shaper.deb"])?;
    let version = inside(&["shaper", "--version"])?;
    let checked = inside(&["shaper", "policy", "check", "/etc/shaper/shaper.toml"])?;
    let conffiles = inside(&["dpkg-query", "-W", "-f=${Conffiles}", "shaper"])?;
    for f in ["/etc/shaper/shaper.toml", "/etc/default/shaper"] {
        if !conffiles.contains(f) {
            bail!("{f} is not a conffile: {conffiles}");
        }
    }
    let policy = std::fs::read_to_string(chroot.join("etc/shaper/shaper.toml"))?;
    if policy.contains("action = \"drop\"") || policy.contains("action = \"defer\"") {
        bail!("the installed policy limits: a fresh install must only count");
    }
    println!(
        "installed in a fresh Debian 12 root: {} {}",
        version.trim(),
        checked.trim()
    );
    // The installed unit under the root's own systemd, booted in a container.
    tests("systemd", &["--ignored"], ("SHAPER_DEB_ROOT", &chroot))
}

/// Run the privileged test file `file` (one test at a time), with `args` after `--`
/// and the environment variable `env` naming a path.
fn tests(file: &str, args: &[&str], env: (&str, &Path)) -> Result<()> {
    let mut all = vec![
        "test",
        "--release",
        "-p",
        "shaper-tests",
        "--test",
        file,
        "--",
        "--test-threads=1",
    ];
    all.extend_from_slice(args);
    crate::cargo_env(&all, &[(env.0, &env.1.to_string_lossy())])
}

/// Removes a directory tree when dropped (the chroot, even on an error).
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Does `cmd` succeed and print `needle`?
fn run_ok(cmd: &mut Command, needle: &str) -> bool {
    cmd.output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(needle))
}

/// `cmd`'s output; an error with its stderr if it fails.
fn capture(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
