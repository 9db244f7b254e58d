//! What the daemon enforces (the interfaces, the policy and its rule ids), and how it
//! changes: an apply from a client, a reload of the config file.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use super::systemd::notify;
use crate::{
    apply::{self, ApplyError, Target},
    attach::Attachment,
    dataplane::Dataplane,
    policy::{Policy, Share},
    protocol,
};

/// One protected interface.
pub struct Iface {
    pub dp: Dataplane,
    pub att: Attachment,
    pub dir: PathBuf,
}

/// What the daemon enforces, shared by the signal loop and the socket handlers.
pub struct State {
    pub ifaces: Vec<Iface>,
    pub policy: Policy,
    /// Each rule's id, the same in every interface's data plane (stable across applies
    /// and restarts).
    pub ids: Vec<u32>,
    pub source: String,
    pub hash: String,
    pub generation: u64,
    pub config: PathBuf,
    /// `shaper run --fleet-share`, which overrides a policy's `[fleet]`.
    pub fleet_override: Option<Share>,
    /// This node's share of the quotas in force (the policy above is already scaled).
    pub share: Share,
    /// Hash of the config file's content when last read: a change of the file (not a
    /// `policy apply` from elsewhere) triggers a reload.
    pub file_hash: String,
    pub started: Instant,
    /// When the policy in force was applied (at start, or by the last apply or reload).
    pub applied_at: SystemTime,
    /// The last reload (SIGHUP, file change, request): whether it was applied, and when.
    pub last_reload: Option<(bool, SystemTime)>,
}

impl State {
    /// Validate `text` whole, then write it into every interface's maps: all of them
    /// switch to it, or none does. Returns the new generation and hash.
    pub fn apply(
        &mut self,
        file: &str,
        text: &str,
        ssh_client: Option<&str>,
        force: bool,
    ) -> Result<(u64, String), ApplyError> {
        let policy = apply::prepare(file, text, ssh_client, force)?;
        let (policy, share) = policy.for_node(self.fleet_override);
        for w in &policy.warnings {
            tracing::warn!("{}", w.warning());
        }
        let mut targets: Vec<Target<'_>> = self
            .ifaces
            .iter_mut()
            .map(|i| Target {
                name: &i.att.iface,
                dp: &mut i.dp,
            })
            .collect();
        self.ids = apply::apply(&mut targets, &policy)?;
        self.policy = policy;
        self.share = share;
        self.source = text.to_string();
        self.hash = protocol::policy_hash(text);
        self.generation += 1;
        self.applied_at = SystemTime::now();
        Ok((self.generation, self.hash.clone()))
    }

    /// The config file's hash, if it differs from the one last read.
    pub fn config_changed(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.config).ok()?;
        let h = protocol::policy_hash(&text);
        (h != self.file_hash).then_some(h)
    }
}

/// Read the config file again and apply it. A refusal keeps the old policy, and is
/// reported where the reload was asked: in the log, to systemd (`STATUS=`, which
/// `systemctl status` shows) and to a client (an error reply).
pub fn reload(state: &Arc<Mutex<State>>, why: &str) -> Result<(u64, String), String> {
    notify("RELOADING=1");
    let result = match state.lock() {
        Ok(mut s) => {
            let r = reload_locked(&mut s).map_err(|e| e.to_string());
            s.last_reload = Some((r.is_ok(), SystemTime::now()));
            r
        }
        Err(_) => Err("internal error: state lock poisoned".to_string()),
    };
    match &result {
        Ok((generation, hash)) => {
            tracing::info!(generation, hash = %hash, "reloaded ({why})");
            notify(&format!(
                "READY=1\nSTATUS=enforcing policy generation {generation} (hash {hash})"
            ));
        }
        Err(e) => {
            tracing::error!("reload ({why}) refused; the old policy stays:\n{e}");
            let first = e.lines().next().unwrap_or_default();
            notify(&format!(
                "READY=1\nSTATUS=reload ({why}) refused, the old policy stays: {first}"
            ));
        }
    }
    result
}

fn reload_locked(s: &mut State) -> Result<(u64, String), ApplyError> {
    let file = s.config.display().to_string();
    let text = std::fs::read_to_string(&s.config).map_err(|source| ApplyError::Read {
        file: file.clone(),
        source,
    })?;
    s.file_hash = protocol::policy_hash(&text);
    s.apply(&file, &text, None, false)
}
