//! Command-line interface (names as in DESIGN.md §4).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use shaper::{attach::Mode, policy};

pub const DEFAULT_CONFIG: &str = "/etc/shaper/shaper.toml";

#[derive(Parser)]
#[command(
    name = "shaper",
    version,
    about = "XDP new-connection shaper: per-subnet quotas at the NIC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it, enforce the policy until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Validate or inspect policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Interface to protect (repeat for several).
    #[arg(long = "iface", required = true)]
    pub ifaces: Vec<String>,
    /// Policy file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Attach mode: native (driver) XDP, generic (skb), or native with fallback.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Print the counters every this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub stats_interval: u64,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: exit 0, or print FILE:LINE:COL: message and exit 1.
    Check { file: PathBuf },
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => crate::run::run(args).map(|()| ExitCode::SUCCESS),
        Command::Policy(PolicyCommand::Check { file }) => match policy::load(&file) {
            Ok(p) => {
                println!(
                    "{}: ok ({} rules, {} protected prefixes, {} protected ports)",
                    file.display(),
                    p.rules.len(),
                    p.protected_prefixes.len(),
                    p.protected_ports.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}
