//! Applying a policy: the one path from text to maps, taken by the daemon (at start, on
//! a reload, on `policy apply`) and by the tests.
//!
//! [`prepare`] parses and validates the text and refuses what would hurt (no rules at
//! all, the operator's own SSH session limited); [`apply`] gives every rule its id,
//! compiles once, checks that the result fits every data plane, and writes it into all
//! of them so that all switch or none does.

use std::{net::IpAddr, time::Duration};

use crate::{
    dataplane::{Dataplane, Staged},
    policy::{self, Action, Policy, PolicyErrors},
};

/// Why a policy was not applied. Nothing was switched: the old policy stays in force
/// on every interface.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The text is not a valid policy (every problem, with its place).
    #[error("{0}")]
    Invalid(#[from] PolicyErrors),
    /// The policy has no rules (an empty or truncated file).
    #[error(
        "{file}: the policy has no rules; applying it would lift every limit: refusing \
         (to mean it: `shaper policy apply --force`)"
    )]
    NoRules { file: String },
    /// The policy would limit the SSH session the request came from.
    #[error("{0}; refusing to apply (add the address to [protect] prefixes, or pass --force)")]
    LocksOut(String),
    /// The policy needs more entries than a data plane holds.
    #[error("{0}")]
    DoesNotFit(String),
    /// Every rule id is in use by some interface's active policy.
    #[error(
        "no free rule id: the data plane holds {0} rule ids, and a rule that changes takes \
         a new one while the active policy keeps its old one until the switch (a policy \
         that changes every rule needs twice its rules): raise --max-rules"
    )]
    NoFreeId(u32),
    /// Writing the maps failed (the kernel refused an update).
    #[error("{target}: writing the policy into the maps: {source:#}")]
    Write {
        target: String,
        source: anyhow::Error,
    },
    /// The config file could not be read.
    #[error("{file}: cannot read the policy: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
}

/// Parse and validate `text` (named `file` in errors), then refuse a policy without
/// rules and one that would limit the SSH session `ssh_client` (`SSH_CONNECTION`:
/// "client port server port"), unless `force`.
pub fn prepare(
    file: &str,
    text: &str,
    ssh_client: Option<&str>,
    force: bool,
) -> Result<Policy, ApplyError> {
    let policy = policy::parse(file, text)?;
    if force {
        return Ok(policy);
    }
    if policy.rules.is_empty() {
        // An empty or truncated file parses; enforcing it would lift every limit.
        return Err(ApplyError::NoRules {
            file: file.to_string(),
        });
    }
    if let Some(why) = ssh_client.and_then(|c| locks_out(&policy, c)) {
        return Err(ApplyError::LocksOut(why));
    }
    Ok(policy)
}

/// Would `policy` limit new connections of the SSH session `ssh_connection`? Says why.
fn locks_out(policy: &Policy, ssh_connection: &str) -> Option<String> {
    let mut parts = ssh_connection.split_whitespace();
    let client: IpAddr = parts.next()?.parse().ok()?;
    let server_port: Option<u16> = parts.nth(2).and_then(|p| p.parse().ok());
    if policy.protects(client) || server_port.is_some_and(|p| policy.protected_ports.contains(&p)) {
        return None;
    }
    let rule = policy
        .rules
        .iter()
        .filter(|r| r.prefix.contains(client))
        .max_by_key(|r| r.prefix.len)?;
    matches!(rule.action, Action::Drop | Action::Defer).then(|| {
        format!(
            "rule `{}` ({}, {}) would limit new connections from your SSH client {client}",
            rule.name,
            rule.prefix,
            rule.action.name()
        )
    })
}

/// A data plane to write to, and its name in errors (its interface).
pub struct Target<'a> {
    pub name: &'a str,
    pub dp: &'a mut Dataplane,
}

/// Write `policy` into every target, all or none, and return each rule's id (the same
/// on every target).
///
/// A rule defined exactly as before keeps its id, and so its counters, groups and
/// waiting clients (also across daemon restarts: the ids are pinned); other rules get
/// ids that no target's active policy uses. The policy is compiled once, checked
/// against every target's capacity, then staged on every target (its entries under the
/// inactive generation); only when all are staged does each switch, by one atomic
/// store, and then the old generations go. A failure before the switches leaves every
/// target on its old policy.
pub fn apply(targets: &mut [Target<'_>], policy: &Policy) -> Result<Vec<u32>, ApplyError> {
    let write = |t: &Target<'_>| {
        let target = t.name.to_string();
        move |source| ApplyError::Write { target, source }
    };
    let hashes = rule_hashes(&policy.rules);
    let mut current = Vec::with_capacity(targets.len());
    for t in targets.iter() {
        current.push(t.dp.rule_hashes().map_err(write(t))?);
    }
    let ids = choose_ids(&current, &hashes)?;
    let compiled = policy.compile_with_ids(&ids);
    for t in targets.iter() {
        t.dp.capacity
            .check(&compiled)
            .map_err(ApplyError::DoesNotFit)?;
    }
    let mut staged: Vec<Staged> = Vec::with_capacity(targets.len());
    for (t, cur) in targets.iter_mut().zip(&current) {
        // Ids this target's maps hold for no rule or another: cleared before use.
        let fresh: Vec<u32> = ids
            .iter()
            .zip(&hashes)
            .filter(|(id, h)| cur.get(**id as usize) != Some(*h))
            .map(|(id, _)| *id)
            .collect();
        staged.push(t.dp.stage(&compiled, &fresh).map_err(write(t))?);
    }
    for (t, s) in targets.iter_mut().zip(&staged) {
        t.dp.switch(s).map_err(write(t))?;
    }
    // Packets that read the old generation finish within microseconds; give them a
    // wide margin before its entries go.
    std::thread::sleep(Duration::from_millis(20));
    for ((t, s), had) in targets.iter_mut().zip(&staged).zip(&current) {
        // The rule each id serves from now on (0: none).
        let mut want = vec![0u64; had.len()];
        for (id, h) in ids.iter().zip(&hashes) {
            if let Some(w) = want.get_mut(*id as usize) {
                *w = *h;
            }
        }
        t.dp.retire(s, had, &want).map_err(write(t))?;
    }
    Ok(ids)
}

/// One id per rule (by definition hash), valid on every target: an id whose every
/// target holds this rule or nothing, preferring one that some target holds it under
/// already (most targets first); else an id free everywhere.
fn choose_ids(current: &[Vec<u64>], hashes: &[u64]) -> Result<Vec<u32>, ApplyError> {
    let cap = current.iter().map(Vec::len).min().unwrap_or(0);
    let cap_u32 = u32::try_from(cap).unwrap_or(u32::MAX);
    let mut taken = vec![false; cap];
    let mut ids: Vec<Option<u32>> = vec![None; hashes.len()];
    // Where some target holds a rule now: (hash, id), sorted (a million rules make a
    // million entries; one small vector each was most of an apply's bookkeeping).
    let mut held: Vec<(u64, usize)> = current
        .iter()
        .flat_map(|c| c.iter().copied().enumerate().take(cap))
        .filter(|&(_, h)| h != 0)
        .map(|(id, h)| (h, id))
        .collect();
    held.sort_unstable();
    held.dedup();
    // How many targets hold rule `h` under `id`; none if one holds another rule there.
    let holding = |id: usize, h: u64| -> Option<usize> {
        let mut n = 0;
        for c in current {
            match c.get(id).copied() {
                Some(x) if x == h => n += 1,
                Some(0) => {}
                _ => return None,
            }
        }
        Some(n)
    };
    for (slot, &h) in ids.iter_mut().zip(hashes) {
        let from = held.partition_point(|&(x, _)| x < h);
        let best = held[from..]
            .iter()
            .take_while(|&&(x, _)| x == h)
            .map(|&(_, id)| id)
            .filter(|&id| !taken[id])
            .filter_map(|id| holding(id, h).map(|n| (n, id)))
            .max_by_key(|&(n, id)| (n, std::cmp::Reverse(id)));
        if let Some((_, id)) = best {
            taken[id] = true;
            *slot = u32::try_from(id).ok();
        }
    }
    let mut free = (0..cap).filter(|&id| current.iter().all(|c| c[id] == 0));
    for slot in ids.iter_mut().filter(|s| s.is_none()) {
        let id = free
            .by_ref()
            .find(|&id| !taken[id])
            .ok_or(ApplyError::NoFreeId(cap_u32))?;
        taken[id] = true;
        *slot = u32::try_from(id).ok();
    }
    Ok(ids.into_iter().flatten().collect())
}

/// Each rule's [`rule_hash`], on every CPU (a million rules take a third of a second
/// on one).
fn rule_hashes(rules: &[policy::Rule]) -> Vec<u64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = rules.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = rules
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(rule_hash).collect::<Vec<u64>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// A nonzero hash of a rule's whole definition: FNV-1a over its JSON form, hashed as
/// it is written (a million rules are hashed in every apply of a million-rule policy).
fn rule_hash(r: &policy::Rule) -> u64 {
    struct Fnv(u64);
    impl std::io::Write for Fnv {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = policy::fnv1a_from(self.0, bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Fnv(policy::FNV_OFFSET);
    // Writing to `Fnv` cannot fail, nor can serializing a rule.
    let _ = serde_json::to_writer(&mut h, r);
    h.0 | 1
}

#[cfg(test)]
mod tests {
    use super::{ApplyError, choose_ids};

    #[test]
    fn a_rule_keeps_its_id_where_every_target_agrees() {
        // Rule 7 is id 2 on both; rule 9 is id 0 on the first and new on the second.
        let current = vec![vec![9, 0, 7, 0], vec![0, 0, 7, 5]];
        assert_eq!(choose_ids(&current, &[7, 9]).expect("ids"), [2, 0]);
        // A new rule gets an id free on every target (not 3: the second uses it).
        assert_eq!(choose_ids(&current, &[7, 9, 11]).expect("ids"), [2, 0, 1]);
    }

    #[test]
    fn an_id_held_for_another_rule_on_one_target_is_not_used() {
        // Rule 7 is id 0 on the first target, but the second holds rule 5 there.
        let current = vec![vec![7, 0], vec![5, 0]];
        assert_eq!(choose_ids(&current, &[7]).expect("ids"), [1]);
        let full = vec![vec![7, 3], vec![5, 4]];
        assert!(matches!(
            choose_ids(&full, &[7]),
            Err(ApplyError::NoFreeId(2))
        ));
    }
}
