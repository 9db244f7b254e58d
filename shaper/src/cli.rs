//! Command-line interface: `shaper run` (the daemon) and the client commands that talk
//! to it over the control socket (`policy`, `stats`, `top`, `status`), plus `detach`,
//! which needs no daemon.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use shaper::{
    attach::Mode,
    capacity::Capacity,
    client, pins, policy,
    protocol::{DEFAULT_SOCKET, Request, Response},
};
use shaper_common::maps;

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
    Stats {
        #[command(flatten)]
        client: ClientArgs,
        /// Refresh every second until interrupted, showing rates per second since the
        /// last refresh (JSON: totals).
        #[arg(long)]
        watch: bool,
    },
    /// The groups nearest to (or over) their budget, live like `top`: per group its
    /// SYNs admitted, dropped and deferred per second, its line (clients waiting, the
    /// oldest's wait) and its budget, the most limited first. `q` quits. When the
    /// output is not a terminal (or with --once), prints the table once, its rates
    /// measured over one interval; `-o json` prints the groups' totals once.
    Top {
        /// How many groups.
        #[arg(short, default_value_t = 20)]
        n: u32,
        /// Only the groups of this rule.
        #[arg(long, value_name = "NAME")]
        rule: Option<String>,
        /// Seconds between refreshes (0.1 to 60).
        #[arg(long, default_value_t = 1.0, value_parser = interval)]
        interval: f64,
        /// Print once and exit, even on a terminal.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Break-glass: remove the program and its pinned state from interfaces (all shaper
    /// interfaces if none is named). Needs no daemon.
    Detach {
        ifaces: Vec<String>,
        #[arg(long, default_value = pins::DEFAULT_ROOT)]
        pin_root: PathBuf,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), or with --dir write one page per command there
    /// (shaper.1, shaper-run.1, shaper-policy-apply.1, …), as its SEE ALSO names them.
    Man {
        /// Directory to write every page into (e.g. /usr/local/share/man/man1).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
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
    /// Serve Prometheus metrics at http://ADDR/metrics (`off`: not at all).
    #[arg(long, value_name = "ADDR", default_value = shaper::daemon::metrics::DEFAULT_ADDR, value_parser = metrics_addr)]
    pub metrics: MetricsAddr,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// This node's share of every rule's rate, burst and ceiling, when N servers
    /// behind a load balancer enforce one platform's policy: `1/4`, `0.25` or `25%`
    /// (over the policy's `[fleet]`; a DaemonSet sets it in the environment).
    #[arg(long, value_name = "SHARE", env = "SHAPER_FLEET_SHARE", value_parser = policy::Share::parse)]
    pub fleet_share: Option<policy::Share>,
}

/// The data plane's capacity, fixed when its maps are first made (they are pinned, so
/// a restart must ask the same; `shaper detach` removes them to resize).
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct LimitArgs {
    /// Most rules the policy may hold.
    #[arg(long, value_name = "N", default_value_t = maps::MAX_RULES,
          value_parser = clap::value_parser!(u32).range(1..=MAX_LIMIT))]
    pub max_rules: u32,
    /// Most prefixes per address family (rules, protected prefixes, and the blocks
    /// cached around more specific ones); twice what a policy may use, for the swap.
    #[arg(long, value_name = "N", default_value_t = maps::MAX_PREFIXES,
          value_parser = clap::value_parser!(u32).range(2..=MAX_LIMIT))]
    pub max_prefixes: u32,
    /// Subnets tracked at once (rounded up to a power of two).
    #[arg(long, value_name = "N", default_value_t = maps::MAX_GROUPS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_LIMIT))]
    pub max_groups: u32,
    /// Clients waiting in `defer` lines at once, all rules together.
    #[arg(long, value_name = "N", default_value_t = maps::MAX_WAITERS,
          value_parser = clap::value_parser!(u32).range(1..=MAX_LIMIT))]
    pub max_waiters: u32,
}

const MAX_LIMIT: i64 = shaper::capacity::MAX_LIMIT as i64;

impl From<LimitArgs> for Capacity {
    fn from(a: LimitArgs) -> Capacity {
        Capacity {
            rules: a.max_rules,
            prefixes: a.max_prefixes,
            groups: a.max_groups,
            waiters: a.max_waiters,
            ..Capacity::default()
        }
    }
}

/// `--metrics`: where to serve, or nowhere.
#[derive(Clone, Copy, Debug)]
pub struct MetricsAddr(Option<std::net::SocketAddr>);

/// `--metrics`: an address and port, or `off`.
fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s == "off" {
        return Ok(MetricsAddr(None));
    }
    s.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| {
        format!("`{s}` is not an address and port like 127.0.0.1:9101 or [::1]:9101 (or `off`)")
    })
}

impl From<RunArgs> for shaper::daemon::Config {
    fn from(a: RunArgs) -> Self {
        shaper::daemon::Config {
            ifaces: a.ifaces,
            config: a.config,
            mode: a.mode,
            stats_interval: std::time::Duration::from_secs(a.stats_interval),
            socket: a.socket,
            pin_root: a.pin_root,
            replace: a.replace,
            metrics: a.metrics.0,
            capacity: a.limits.into(),
            fleet_share: a.fleet_share,
        }
    }
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

/// `--interval`: seconds, 0.1 to 60.
fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if (0.1..=60.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} s is outside 0.1 to 60 s"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: exit 0, or print FILE:LINE:COL: message and exit 1.
    Check {
        file: PathBuf,
        /// The capacity to check against: the daemon's `shaper run` limits.
        #[command(flatten)]
        limits: LimitArgs,
    },
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
    /// Add or replace one rule of the active policy (through the same validation and
    /// atomic switch as `apply`; the config file is not changed).
    Set(SetArgs),
    /// Remove one rule from the active policy.
    Rm {
        name: String,
        /// Apply even if it would limit the SSH session this command runs from.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(clap::Args)]
pub struct SetArgs {
    pub name: String,
    /// Source prefix (needed for a new rule).
    #[arg(long)]
    pub prefix: Option<String>,
    /// New connections per second per group ("20", "20/s", "1200/min"; needed for a
    /// new rule).
    #[arg(long)]
    pub rate: Option<String>,
    #[arg(long)]
    pub burst: Option<i64>,
    /// Group length in bits.
    #[arg(long)]
    pub group: Option<i64>,
    /// allow, monitor, drop or defer.
    #[arg(long)]
    pub action: Option<String>,
    /// Whole-rule budget per second.
    #[arg(long)]
    pub ceiling: Option<String>,
    /// `defer`: how long a client keeps its place ("90s", "2min", or seconds).
    #[arg(long)]
    pub max_wait: Option<String>,
    /// `defer`: most clients one group keeps waiting.
    #[arg(long)]
    pub max_waiting: Option<i64>,
    /// Apply even if it would limit the SSH session this command runs from.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => shaper::daemon::run(args.into()).map(|()| ExitCode::SUCCESS),
        Command::Policy(PolicyCommand::Check { file, limits }) => match policy::load(&file) {
            // Everything an apply checks short of writing maps: the data plane's size
            // too (the daemon's, given as its `shaper run` limits).
            Ok(p) if let Err(e) = Capacity::from(limits).check(&p.compile()) => {
                eprintln!("{}: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
            Ok(p) => {
                for w in &p.warnings {
                    eprintln!("{}", w.warning());
                }
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
            let reply = client::call(
                &client.socket,
                Request::PolicyApply {
                    file: file.display().to_string(),
                    text,
                    ssh_client: std::env::var("SSH_CONNECTION").ok(),
                    force,
                },
            )?;
            print_reply(&reply, client.output, applied)
        }
        Command::Policy(PolicyCommand::Set(a)) => {
            // Only the flags given change; the rule's other keys, and the policy's
            // comments, stay as they are.
            let mut changes = toml::Table::new();
            let text = |v: &Option<String>| v.clone().map(toml::Value::from);
            for (k, v) in [
                ("prefix", text(&a.prefix)),
                ("rate", a.rate.as_deref().map(number_or_text)),
                ("burst", a.burst.map(toml::Value::from)),
                ("group", a.group.map(toml::Value::from)),
                ("action", text(&a.action)),
                ("ceiling", a.ceiling.as_deref().map(number_or_text)),
                ("max_wait", a.max_wait.as_deref().map(number_or_text)),
                ("max_waiting", a.max_waiting.map(toml::Value::from)),
            ] {
                if let Some(v) = v {
                    changes.insert(k.into(), v);
                }
            }
            edit_policy(&a.client, a.force, "set", |source| {
                set_rule(source, &a.name, &changes)
            })
        }
        Command::Policy(PolicyCommand::Rm {
            name,
            force,
            client,
        }) => edit_policy(&client, force, "rm", |source| rm_rule(source, &name)),
        Command::Policy(PolicyCommand::Show(c)) => {
            let reply = client::call(&c.socket, Request::PolicyShow)?;
            print_reply(&reply, c.output, |r| match r {
                Response::Policy(p) => format!(
                    "# generation {}, policy hash {}\n{}",
                    p.generation, p.hash, p.source
                ),
                _ => String::new(),
            })
        }
        Command::Status(c) => {
            let reply = client::call(&c.socket, Request::Status)?;
            print_reply(&reply, c.output, crate::render::status)
        }
        Command::Stats { client, watch } => {
            let mut before: Option<(Response, std::time::Instant)> = None;
            loop {
                let reply = client::call(&client.socket, Request::Stats)?;
                let now = std::time::Instant::now();
                if !watch {
                    return print_reply(&reply, client.output, crate::render::stats);
                }
                if client.output == Output::Table {
                    use std::io::IsTerminal as _;
                    if std::io::stdout().is_terminal() {
                        // Clear the screen and go home, like watch(1).
                        print!("\x1b[2J\x1b[H");
                    } else {
                        // Into a pipe or a file: one table after another, no control codes.
                        println!();
                    }
                }
                // The table shows rates since the last refresh (totals until there is
                // one); JSON stays totals, for a consumer to difference.
                let shown = match &before {
                    Some((prev, at)) => print_reply(&reply, client.output, |r| {
                        crate::render::stats_rates(prev, r, now.duration_since(*at).as_secs_f64())
                    })?,
                    None => print_reply(&reply, client.output, crate::render::stats)?,
                };
                if shown != ExitCode::SUCCESS {
                    return Ok(ExitCode::FAILURE);
                }
                before = Some((reply, now));
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Command::Top {
            n,
            rule,
            interval,
            once,
            client,
        } => {
            use std::io::IsTerminal as _;
            let ask = || {
                client::call(
                    &client.socket,
                    Request::Top {
                        n,
                        rule: rule.clone(),
                    },
                )
            };
            let interval = std::time::Duration::from_secs_f64(interval);
            let first = ask()?;
            if client.output == Output::Json || matches!(first, Response::Error { .. }) {
                return print_reply(&first, client.output, |r| crate::render::top(None, r));
            }
            if once || !std::io::stdout().is_terminal() {
                let at = std::time::Instant::now();
                std::thread::sleep(interval);
                let second = ask()?;
                let prev = match &first {
                    Response::Top { groups } => {
                        Some((groups.as_slice(), at.elapsed().as_secs_f64()))
                    }
                    _ => None,
                };
                return print_reply(&second, Output::Table, |r| crate::render::top(prev, r));
            }
            crate::top::live(first, ask, interval, rule.as_deref())
        }
        Command::Detach { ifaces, pin_root } => detach(&ifaces, &pin_root),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shaper", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: None } => {
            // No `help` subcommand in SEE ALSO: --dir writes no page for it.
            let cmd = Cli::command().disable_help_subcommand(true);
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("--dir: creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("--dir: writing the pages into {}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Validate one rule given by flags; errors name the flag (`--rate: …`).
fn check_flags(rule: &toml::Table) -> Option<String> {
    let mut text = String::from("[[rule]]\n");
    let mut keys = vec![""];
    for (k, v) in rule {
        text.push_str(&format!("{k} = {v}\n"));
        keys.push(k.as_str());
    }
    let errors = policy::parse("flags", &text).err()?;
    Some(
        errors
            .0
            .iter()
            .map(|e| match keys.get(e.line.saturating_sub(1)) {
                Some(k) if !k.is_empty() => format!("--{}: {}", k.replace('_', "-"), e.message),
                _ => e.message.clone(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// A flag's value as the policy file writes it: an integer ("20", "60"), or a
/// string ("20/s", "90s").
fn number_or_text(s: &str) -> toml::Value {
    match s.parse::<i64>() {
        Ok(n) => n.into(),
        Err(_) => s.to_string().into(),
    }
}

/// A policy's text as a TOML document that keeps its comments.
fn document(source: &str) -> Result<toml_edit::DocumentMut> {
    source
        .parse()
        .context("the active policy does not parse as TOML")
}

fn named(t: &toml_edit::Table, name: &str) -> bool {
    t.get("name").and_then(|n| n.as_str()) == Some(name)
}

/// `policy set`: change the keys in `changes` of the rule `name` (keeping its other
/// keys and every comment), or add the rule if there is none (then `prefix` and `rate`
/// are needed). Errors name the flag.
fn set_rule(source: &str, name: &str, changes: &toml::Table) -> Result<String> {
    let mut doc = document(source)?;
    let rules = doc
        .entry("rule")
        .or_insert_with(|| toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or_else(|| anyhow::anyhow!("the active policy's `rule` is not a list of tables"))?;
    let existing = rules.iter_mut().find(|t| named(t, name));
    // The rule as it will be, checked alone first so errors name the flag.
    let mut merged: toml::Table = match &existing {
        Some(t) => toml::from_str(&t.to_string()).context("reading the rule")?,
        None => {
            for need in ["prefix", "rate"] {
                if !changes.contains_key(need) {
                    bail!(
                        "--{need}: there is no rule `{name}` yet, and a new rule needs --prefix and --rate"
                    );
                }
            }
            toml::Table::new()
        }
    };
    merged.insert("name".into(), name.into());
    for (k, v) in changes {
        merged.insert(k.clone(), v.clone());
    }
    if let Some(msg) = check_flags(&merged) {
        bail!("{msg}");
    }
    let table = match existing {
        Some(t) => t,
        None => {
            let mut t = toml_edit::Table::new();
            t.insert("name", toml_edit::value(name));
            rules.push(t);
            rules
                .iter_mut()
                .last()
                .ok_or_else(|| anyhow::anyhow!("the new rule went missing"))?
        }
    };
    for (k, v) in changes {
        let v: toml_edit::Value = v.to_string().parse().context("a flag's value")?;
        match table.get_mut(k).and_then(|i| i.as_value_mut()) {
            // Keep the value's own comment and spacing.
            Some(old) => {
                let decor = old.decor().clone();
                *old = v;
                *old.decor_mut() = decor;
            }
            None => {
                table.insert(k, toml_edit::Item::Value(v));
            }
        }
    }
    Ok(doc.to_string())
}

/// `policy rm`: the policy without rule `name`, comments kept.
fn rm_rule(source: &str, name: &str) -> Result<String> {
    let mut doc = document(source)?;
    if let Some(rules) = doc.get_mut("rule").and_then(|r| r.as_array_of_tables_mut()) {
        let before = rules.len();
        rules.retain(|t| !named(t, name));
        if rules.len() < before {
            return Ok(doc.to_string());
        }
    }
    bail!("no rule named `{name}` in the active policy (see `shaper policy show`)")
}

/// Fetch the active policy, edit its text, apply the result like `policy apply`. The
/// change is live only: the policy file is not written, and says so.
fn edit_policy(
    client: &ClientArgs,
    force: bool,
    what: &str,
    edit: impl FnOnce(&str) -> Result<String>,
) -> Result<ExitCode> {
    let Response::Policy(view) = client::call(&client.socket, Request::PolicyShow)? else {
        bail!("the daemon did not return its policy");
    };
    let text = edit(&view.source)?;
    let name = format!("policy {what}");
    if let Err(errors) = policy::parse(&name, &text) {
        eprintln!("{errors}\nnothing was applied");
        return Ok(ExitCode::FAILURE);
    }
    let reply = client::call(
        &client.socket,
        Request::PolicyApply {
            file: name,
            text,
            ssh_client: std::env::var("SSH_CONNECTION").ok(),
            force,
        },
    )?;
    let code = print_reply(&reply, client.output, applied)?;
    if matches!(reply, Response::Applied { .. })
        && let Ok(Response::Status(s)) = client::call(&client.socket, Request::Status)
    {
        eprintln!(
            "live only: {} is unchanged, and its next reload (SIGHUP, `systemctl reload`, \
             an edit) replaces this change; `shaper policy show` prints the policy to keep",
            s.config
        );
    }
    Ok(code)
}

/// Human output of an applied policy.
fn applied(r: &Response) -> String {
    match r {
        Response::Applied { generation, hash } => {
            format!("applied: generation {generation}, policy hash {hash}")
        }
        _ => String::new(),
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
    if !rustix::process::geteuid().is_root() {
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

#[cfg(test)]
mod tests {
    use super::{rm_rule, set_rule};

    const ACTIVE: &str = r#"# the morning
[[rule]]
name = "schools"      # every school /24
prefix = "198.51.100.0/22"
rate = 6
burst = 40            # a class at once
action = "defer"
max_wait = "90s"

[[rule]]
name = "lab"
prefix = "203.0.113.0/24"
rate = 5
"#;

    fn changes(kv: &[(&str, toml::Value)]) -> toml::Table {
        kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn set_changes_only_the_flags_given_and_keeps_comments() {
        let out = set_rule(ACTIVE, "schools", &changes(&[("rate", 30.into())])).expect("set");
        let p = shaper::policy::parse("t", &out).expect("valid");
        let r = &p.rules[0];
        assert_eq!(r.rate.per_second_ceil(), 30);
        assert_eq!(r.burst, 40, "burst kept");
        assert_eq!(r.action, shaper::policy::Action::Defer, "action kept");
        assert_eq!(r.max_wait.as_secs(), 90, "max_wait kept");
        for comment in ["# the morning", "# every school /24", "# a class at once"] {
            assert!(out.contains(comment), "{comment} lost:\n{out}");
        }
        // The other rule is untouched.
        assert!(
            out.contains("name = \"lab\"\nprefix = \"203.0.113.0/24\"\nrate = 5\n"),
            "{out}"
        );
        // New keys: --max-wait and --max-waiting.
        let out = set_rule(
            ACTIVE,
            "schools",
            &changes(&[("max_wait", 60.into()), ("max_waiting", 500.into())]),
        )
        .expect("set");
        let r = &shaper::policy::parse("t", &out).expect("valid").rules[0];
        assert_eq!((r.max_wait.as_secs(), r.max_waiting), (60, 500));
    }

    #[test]
    fn set_adds_a_new_rule_only_with_prefix_and_rate_and_names_bad_flags() {
        let e = set_rule(ACTIVE, "new", &changes(&[("rate", 3.into())])).expect_err("no prefix");
        assert!(e.to_string().starts_with("--prefix: "), "{e}");
        let out = set_rule(
            ACTIVE,
            "new",
            &changes(&[("prefix", "192.0.2.0/24".into()), ("rate", 3.into())]),
        )
        .expect("added");
        assert_eq!(
            shaper::policy::parse("t", &out).expect("valid").rules.len(),
            3
        );
        let e = set_rule(ACTIVE, "schools", &changes(&[("max_wait", "0s".into())]))
            .expect_err("out of range");
        assert!(e.to_string().starts_with("--max-wait: "), "{e}");
    }

    #[test]
    fn rm_keeps_the_rest_and_its_comments() {
        let out = rm_rule(ACTIVE, "lab").expect("rm");
        assert!(
            !out.contains("lab") && out.contains("# a class at once"),
            "{out}"
        );
        assert!(rm_rule(ACTIVE, "nope").is_err());
    }
}
