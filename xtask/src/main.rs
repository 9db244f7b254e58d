//! Project tasks: `cargo xtask setup | test | demo | bench | lint | package`.
//!
//! Orchestration only: every task runs set-up first, which installs what a fresh
//! machine lacks (rust-src for nightly, LLVM 22 dev packages, bpf-linker, the network
//! tools the tests use) and says clearly what it cannot do.

mod package;
mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (idempotent; quick when all is there).
    Setup,
    /// Set up, build, run the host tests and the privileged (BPF, netns) tests.
    Test,
    /// Benchmarks: `prog` (ns per packet under BPF_PROG_TEST_RUN, against a bare
    /// program), `scale` (a million rules), `contention` (one group from two CPUs),
    /// `flood` (a flood's cost next to nftables and iptables), `storm` (the waiting
    /// line's sweep of real-client storms, then side by side with nftables and
    /// iptables, ~32 min), `scrape` (`/metrics` time and size at 10 to 10,000 rules),
    /// `all` (each in turn; CI runs `all --quick`).
    Bench {
        #[arg(default_value = "prog")]
        which: String,
        /// Only the cases whose name contains this (e.g. "SYN dropped").
        cases: Option<String>,
        /// Every scenario briefly (a smoke run: it judges no figure).
        #[arg(long)]
        quick: bool,
        /// `storm`: only these points, LOAD:BURST[,…] (e.g. `3:5,6:20`).
        #[arg(long, value_name = "POINTS")]
        only: Option<String>,
    },
    /// An 8 a.m. storm in a network-namespace testbed, with live counters (root).
    Demo,
    /// cargo fmt --check and cargo clippy -D warnings.
    Lint,
    /// The Debian package (cargo-deb) in target/package/: the binary, the unit, man
    /// pages, completions, docs, a monitor-only policy as a conffile.
    Package {
        /// Build a static binary (musl) and package that; prints its size.
        #[arg(long = "static")]
        static_binary: bool,
        /// Install the package into a fresh Debian 12 root (debootstrap, chroot) and
        /// run it there.
        #[arg(long)]
        check: bool,
    },
}

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Setup => setup::setup(),
        Task::Test => {
            setup::setup()?;
            test()
        }
        Task::Bench {
            which,
            cases,
            quick,
            only,
        } => {
            setup::setup()?;
            // The storms run the release daemon and the crowd helper.
            cargo(&["build", "--release", "-p", "shaper"])?;
            cargo(&["build", "--release", "-p", "shaper-tests", "--bins"])?;
            let bin = workspace_root().join("target/release/shaper");
            let mut args = vec![
                "run",
                "--release",
                "-p",
                "shaper-tests",
                "--bin",
                "shaper-bench",
                "--",
                &which,
            ];
            args.extend(cases.as_deref());
            if quick {
                args.push("--quick");
            }
            if let Some(points) = only.as_deref() {
                args.extend(["--only", points]);
            }
            cargo_env(&args, &[("SHAPER_BIN", &bin.to_string_lossy())])
        }
        Task::Demo => {
            setup::setup()?;
            cargo(&["build", "--release", "-p", "shaper"])?;
            // The demo's crowds run in the crowd helper, a binary of its own.
            cargo(&["build", "--release", "-p", "shaper-tests", "--bins"])?;
            let bin = workspace_root().join("target/release/shaper");
            cargo_env(
                &[
                    "run",
                    "--release",
                    "-q",
                    "-p",
                    "shaper-tests",
                    "--bin",
                    "shaper-demo",
                ],
                &[("SHAPER_BIN", &bin.to_string_lossy())],
            )
        }
        Task::Lint => {
            setup::setup()?;
            lint()
        }
        Task::Package {
            static_binary,
            check,
        } => {
            setup::setup()?;
            package::package(static_binary, check)
        }
    }
}

/// Run cargo with `args` from the workspace root; fail if it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_env(args, &[])
}

pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let root = workspace_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(&root)
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

fn test() -> Result<()> {
    cargo(&["build", "-p", "shaper"])?;
    // Host tests: shared logic (unit and property tests), policy, CLI helpers.
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "shaper-ebpf",
        "--exclude",
        "shaper-tests",
    ])?;
    // Privileged tests: the real program in the kernel and network namespaces. They
    // fail (never skip) without root and BPF. One at a time: they share two CPUs.
    let bin = workspace_root().join("target/debug/shaper");
    let bin = bin.to_string_lossy();
    cargo_env(
        &["test", "-p", "shaper-tests", "--", "--test-threads=1"],
        &[("SHAPER_BIN", &bin)],
    )
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "shaper-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The XDP program: its own target and toolchain (what aya-build uses to build it).
    let root = workspace_root();
    let args = [
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        "../target/ebpf-clippy",
        "--",
        "-D",
        "warnings",
    ];
    let status = Command::new("rustup")
        .args(args)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .current_dir(root.join("shaper-ebpf"))
        .status()
        .context("running rustup run nightly cargo clippy (shaper-ebpf)")?;
    if !status.success() {
        bail!("clippy of shaper-ebpf failed ({status})");
    }
    Ok(())
}
