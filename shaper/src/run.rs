//! `shaper run`: load, apply the policy, attach, wait for a signal, detach.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use shaper::{
    attach,
    dataplane::{Capacity, Dataplane},
    policy,
};
use shaper_common::{Outcome, Reason};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> Result<()> {
    let policy = policy::load(&args.config).map_err(|e| {
        anyhow!(
            "{e}\nthe policy is invalid; nothing was loaded (check it with `shaper policy check`)"
        )
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Loading runs the verifier: keep it off the async threads.
        let mut dp = tokio::task::spawn_blocking(|| Dataplane::load(Capacity::default()))
            .await
            .context("the loader task failed")??;
        dp.apply(&policy.compile())
            .context("writing the policy into the maps")?;
        let mut links = Vec::new();
        for iface in &args.ifaces {
            let (link, mode) = attach::attach(dp.program()?, iface, args.mode)?;
            tracing::info!(iface, %mode, "attached");
            links.push(link);
        }
        tracing::info!(
            rules = policy.rules.len(),
            config = %args.config.display(),
            "enforcing"
        );
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let every = Duration::from_secs(args.stats_interval.max(1));
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick(), if args.stats_interval > 0 => log_counters(&dp, &policy),
            }
        }
        log_counters(&dp, &policy);
        for link in links {
            dp.program()?.detach(link).context("detaching")?;
        }
        tracing::info!("detached; exiting");
        Ok(())
    })
}

fn log_counters(dp: &Dataplane, policy: &policy::Policy) {
    match dp.global_counters() {
        Ok(g) => {
            let line: Vec<String> = Reason::ALL
                .iter()
                .zip(g.iter())
                .filter(|(_, v)| **v > 0)
                .map(|(r, v)| format!("{}={v}", r.name()))
                .collect();
            tracing::info!(counters = %line.join(" "), "global");
        }
        Err(e) => tracing::warn!(error = %e, "reading counters"),
    }
    for (id, rule) in policy.rules.iter().enumerate() {
        if let Ok(s) = dp.rule_counters(id as u32) {
            tracing::info!(
                rule = %rule.name,
                admitted = s.get(Outcome::Admitted),
                dropped = s.get(Outcome::Dropped),
                deferred = s.get(Outcome::Deferred),
                admitted_after_wait = s.get(Outcome::AdmittedAfterWait),
                queue_full = s.get(Outcome::QueueFull),
                would_drop = s.get(Outcome::WouldDrop),
                protected = s.get(Outcome::Protected),
                "rule"
            );
        }
    }
}
