//! The daemon (`shaper run`): load (or adopt) the pinned data plane on each interface,
//! enforce the policy, serve the control socket, reload on SIGHUP or when the config
//! file changes. SIGTERM/SIGINT stop the daemon and leave the program attached:
//! stopping protection is `shaper detach`, not a restart.
//!
//! One module per concern: [`state`] (what is enforced, applies and reloads), `server`
//! (the control socket), `report` (status, stats, top, the counters in the log),
//! `systemd` (readiness and status), `bpflog` (the program's log records), `metrics`
//! (`/metrics` for Prometheus). A new endpoint is a module of its own here, started
//! from [`run`] and reading [`state::State`].

mod bpflog;
pub mod metrics;
mod report;
mod server;
pub mod state;
mod systemd;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use tokio::signal::unix::{SignalKind, signal};

use self::{
    state::{Iface, State},
    systemd::notify,
};
use crate::{
    apply::{self, Target},
    attach::{self, Mode},
    dataplane::Loader,
    pins,
    policy::Share,
    protocol,
};

/// How the daemon runs (`shaper run`'s flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Interfaces to protect.
    pub ifaces: Vec<String>,
    /// The policy file.
    pub config: PathBuf,
    /// How to attach.
    pub mode: Mode,
    /// Log the counters this often (never if zero).
    pub stats_interval: Duration,
    /// The control socket.
    pub socket: PathBuf,
    /// Where links and maps are pinned (one directory per interface).
    pub pin_root: PathBuf,
    /// Take an interface over from another tool's XDP program.
    pub replace: bool,
    /// Where `/metrics` is served (none: not at all).
    pub metrics: Option<std::net::SocketAddr>,
    /// The data plane's map sizes.
    pub capacity: crate::capacity::Capacity,
    /// This node's share of the quotas (`--fleet-share`), over the file's `[fleet]`.
    pub fleet_share: Option<Share>,
}

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<()> {
    let source = std::fs::read_to_string(&cfg.config)
        .with_context(|| format!("reading the policy file {}", cfg.config.display()))?;
    let file = cfg.config.display().to_string();
    // At start there is no policy in force to keep, so a policy without rules is not
    // refused here (a reload of one is).
    let policy = apply::prepare(&file, &source, None, true).map_err(|e| {
        anyhow!(
            "{e}\nthe policy is invalid; nothing was loaded (check it with `shaper policy check`)"
        )
    })?;
    let (policy, share) = policy.for_node(cfg.fleet_share);
    // Before anything is loaded or pinned: maps made at a size the policy does not fit
    // would have to be removed before a start with larger limits could use them.
    cfg.capacity
        .check(&policy.compile())
        .map_err(|e| anyhow!("{file}: {e}\nnothing was loaded"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Signal handlers before anything is announced (the socket, readiness): a
        // SIGTERM or SIGHUP that comes as soon as the socket answers must not take the
        // default action and kill the daemon.
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
        pins::ensure_root(&cfg.pin_root)?;
        // Every interface's data plane first, then the policy into all of them at
        // once (the same rule ids everywhere), then the attachments.
        let mut loaded = Vec::new();
        for iface in &cfg.ifaces {
            let dir = pins::iface_dir(&cfg.pin_root, iface);
            let d2 = dir.clone();
            // Loading runs the verifier: keep it off the async thread.
            let capacity = cfg.capacity;
            let dp = tokio::task::spawn_blocking(move || {
                Loader::new().capacity(capacity).pinned(&d2).load()
            })
            .await
            .context("the loader task failed")??;
            loaded.push((iface.clone(), dp, dir));
        }
        let mut targets: Vec<Target<'_>> = loaded
            .iter_mut()
            .map(|(name, dp, _)| Target { name, dp })
            .collect();
        let ids = apply::apply(&mut targets, &policy)
            .map_err(|e| anyhow!("writing the policy into the maps: {e}"))?;
        let mut ifaces = Vec::new();
        for (iface, mut dp, dir) in loaded {
            let verified = dp.verified_instructions();
            let att = attach::attach_pinned(dp.program()?, &iface, cfg.mode, &dir, cfg.replace)?;
            tracing::info!(
                iface,
                mode = att.mode_name(|| None),
                prog_id = att.prog_id,
                link_id = att.link_id,
                verified_insns = verified.unwrap_or(0),
                pins = %dir.display(),
                "{}",
                if att.adopted {
                    "adopted the pinned link; program replaced atomically"
                } else {
                    "attached"
                }
            );
            bpflog::forward(&mut dp, &iface);
            ifaces.push(Iface { dp, att, dir });
        }
        let hash = protocol::policy_hash(&source);
        for w in &policy.warnings {
            tracing::warn!("{}", w.warning());
        }
        tracing::info!(
            rules = policy.rules.len(),
            fleet_share = %share,
            config = %cfg.config.display(),
            hash = %hash,
            "enforcing"
        );
        let state = Arc::new(Mutex::new(State {
            ifaces,
            policy,
            ids,
            source,
            file_hash: hash.clone(),
            hash,
            generation: 1,
            config: cfg.config.clone(),
            fleet_override: cfg.fleet_share,
            share,
            started: Instant::now(),
            applied_at: std::time::SystemTime::now(),
            last_reload: None,
        }));
        let listener = server::listen(&cfg.socket)?;
        if let Some(addr) = cfg.metrics {
            metrics::start(addr, state.clone()).await?;
        }
        notify("READY=1");

        let logging = !cfg.stats_interval.is_zero();
        let mut tick = tokio::time::interval(cfg.stats_interval.max(Duration::from_secs(1)));
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        let mut pending: Option<String> = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    let _ = state::reload(&state, "SIGHUP");
                }
                _ = watch.tick() => {
                    // A changed file is applied once it reads the same a second later:
                    // an editor or `cp` caught halfway is never applied.
                    let changed = state.lock().ok().and_then(|s| s.config_changed());
                    match (changed, &pending) {
                        (Some(h), Some(p)) if h == *p => {
                            pending = None;
                            let _ = state::reload(&state, "the config file changed");
                        }
                        (changed, _) => pending = changed,
                    }
                }
                _ = tick.tick(), if logging => {
                    if let Ok(mut s) = state.lock() {
                        report::log_counters(&mut s);
                    }
                }
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        let st = state.clone();
                        tokio::spawn(async move { server::serve(stream, st).await });
                    }
                    Err(e) => tracing::warn!(error = %e, "control socket accept"),
                },
            }
        }
        notify("STOPPING=1");
        let _ = std::fs::remove_file(&cfg.socket);
        if let Ok(mut s) = state.lock() {
            report::log_counters(&mut s);
            for i in &s.ifaces {
                tracing::info!(
                    iface = %i.att.iface,
                    pins = %i.dir.display(),
                    "exiting; the program stays attached and keeps enforcing the policy \
                     (`shaper detach {}` removes it)",
                    i.att.iface
                );
            }
        }
        Ok(())
    })
}
