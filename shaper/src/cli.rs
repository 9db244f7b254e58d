//! Command-line interface (names as in DESIGN.md §4).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use shaper::{
    attach::Mode,
    control::{self, DEFAULT_SOCKET, Request, Response},
    pins, policy,
};

pub const DEFAULT_CONFIG: &str = "/etc/shaper/shaper.toml";

#[derive(Parser)]
#[command(
    name = "shaper",
    version,
    about = "XDP new-connection shaper: per-subnet quotas and a fair waiting line at the NIC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load (or adopt) the XDP program, attach it, enforce the policy; SIGHUP or a
    /// changed config file reloads; SIGTERM stops the daemon and leaves the program
    /// attached.
    Run(RunArgs),
    /// Validate, apply or show policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The daemon: interfaces, attach mode, program ids, policy generation, map fill.
    Status(ClientArgs),
    /// Counters per rule and outcome, and per global reason.
    Stats(ClientArgs),
    /// Break-glass: remove the program and its pinned state from interfaces (all shaper
    /// interfaces if none is named). Needs no daemon.
    Detach {
        ifaces: Vec<String>,
        #[arg(long, default_value = pins::DEFAULT_ROOT)]
        pin_root: PathBuf,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
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
    /// Control socket (root only).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the link and maps are pinned (one directory per interface).
    #[arg(long, default_value = pins::DEFAULT_ROOT)]
    pub pin_root: PathBuf,
    /// Take the interface over from another tool's XDP program.
    #[arg(long)]
    pub replace: bool,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: exit 0, or print FILE:LINE:COL: message and exit 1.
    Check { file: PathBuf },
    /// Validate a policy file and switch the daemon to it: all of it or none of it.
    Apply {
        file: PathBuf,
        /// Apply even if it would limit the SSH session this command runs from.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The policy the daemon enforces.
    Show(ClientArgs),
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
        Command::Policy(PolicyCommand::Apply {
            file,
            force,
            client,
        }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Check here first: errors name the file as the operator wrote it.
            if let Err(errors) = policy::parse(&file.display().to_string(), &text) {
                eprintln!("{errors}\nnothing was applied");
                return Ok(ExitCode::FAILURE);
            }
            let reply = control::call(
                &client.socket,
                Request::PolicyApply {
                    file: file.display().to_string(),
                    text,
                    ssh_client: std::env::var("SSH_CONNECTION").ok(),
                    force,
                },
            )?;
            print_reply(&reply, client.output, |r| match r {
                Response::Applied { generation, hash } => {
                    format!("applied: generation {generation}, policy hash {hash}")
                }
                _ => String::new(),
            })
        }
        Command::Policy(PolicyCommand::Show(c)) => {
            let reply = control::call(&c.socket, Request::PolicyShow)?;
            print_reply(&reply, c.output, |r| match r {
                Response::Policy(p) => format!(
                    "# generation {}, policy hash {}\n{}",
                    p.generation, p.hash, p.source
                ),
                _ => String::new(),
            })
        }
        Command::Status(c) => {
            let reply = control::call(&c.socket, Request::Status)?;
            print_reply(&reply, c.output, crate::table::status)
        }
        Command::Stats(c) => {
            let reply = control::call(&c.socket, Request::Stats)?;
            print_reply(&reply, c.output, crate::table::stats)
        }
        Command::Detach { ifaces, pin_root } => detach(&ifaces, &pin_root),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shaper", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Print a reply as JSON or through `human`; an error reply fails the command.
fn print_reply(
    reply: &Response,
    output: Output,
    human: impl Fn(&Response) -> String,
) -> Result<ExitCode> {
    if let Response::Error { message } = reply {
        eprintln!("shaper: {message}");
        return Ok(ExitCode::FAILURE);
    }
    match output {
        Output::Json => println!("{}", json_body(reply)?),
        Output::Table => println!("{}", human(reply)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The reply's payload as JSON (without the protocol's `response` tag).
fn json_body(reply: &Response) -> Result<String> {
    let mut v = serde_json::to_value(reply)?;
    if let Some(o) = v.as_object_mut() {
        o.remove("response");
    }
    Ok(serde_json::to_string_pretty(&v)?)
}

fn detach(ifaces: &[String], root: &std::path::Path) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("detaching needs root (run with sudo)");
    }
    let names: Vec<String> = if ifaces.is_empty() {
        match std::fs::read_dir(root) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect(),
            Err(_) => Vec::new(),
        }
    } else {
        ifaces.to_vec()
    };
    if names.is_empty() {
        println!("nothing to detach under {}", root.display());
        return Ok(ExitCode::SUCCESS);
    }
    let mut code = ExitCode::SUCCESS;
    for name in names {
        match pins::remove(&pins::iface_dir(root, &name)) {
            Ok(true) => println!("{name}: detached; its pinned state is removed"),
            Ok(false) => {
                eprintln!("{name}: no shaper pins under {}", root.display());
                code = ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("{name}: {e:#}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}
