//! The waiting line of `action = "defer"`: over quota, clients wait their turn, oldest
//! first, and a spoofed flood cannot take their places.
//!
//! The line never sends anything: its poll is the client's own SYN retransmission (same
//! 4-tuple, same ISN, at growing intervals). While a group is **congested** (it refused
//! an attempt in the last [`CONGESTION_HOLD_NS`]):
//!
//! 1. A first SYN is dropped and remembered in a *probe* (a slot of a direct-mapped
//!    table, cheap to overwrite): the client must prove a real TCP stack by knocking
//!    again. A spoofed flood fills probes, never the line.
//! 2. A knock that matches its probe is *proven*: the client joins the line (a bounded
//!    table of waiters with their first-seen time), subject to the group's cap.
//! 3. Every knock of a proven client counts its age (first SYN → now) in this second's
//!    histogram of age buckets. From the previous second's histogram the group
//!    derives a threshold: the oldest bucket that, with the older ones, holds at least
//!    one second of budget. A knock at or above the threshold takes from the budget if
//!    the budget allows; younger knocks wait. So the budget goes to the oldest knockers
//!    first, and when few old clients knock, the threshold falls and younger ones use
//!    the budget: none of it is left unused while proven clients knock.
//!
//! Every admission goes through the group's budget ([`crate::admit`]): the line orders
//! who gets the budget, it never adds to it.
//!
//! The group's line fields are shared by all CPUs and updated without atomics (the
//! budget word is the only exact one): two CPUs can lose a histogram increment or a
//! queue count between them, which shifts the order slightly and never the budget.

use crate::Verdict;

const NS_PER_SEC: u64 = 1_000_000_000;

/// How long a group stays congested after it last refused an attempt.
pub const CONGESTION_HOLD_NS: u64 = 3 * NS_PER_SEC;

/// Age buckets: one second wide for the first six seconds (where Linux knocks every
/// second), then about a quarter wider each: see [`AGE_BOUNDS_S`].
pub const AGE_BUCKETS: usize = 16;

/// Admissions of the burst that knocks at the threshold leave to older knocks (see
/// [`knock`]). A constant amount held back, not a rate: the budget still serves `rate`.
pub const RESERVE: u64 = 2;

/// The line's state inside a group's entry (shared by all CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineState {
    /// The group is congested until this time (monotonic ns).
    pub congested_until_ns: u64,
    /// The second (`now / 1 s`) that `hist` counts.
    pub sec: u64,
    /// Knocks of proven clients this second, by age bucket.
    pub hist: [u32; AGE_BUCKETS],
    /// This second's threshold: knocks need an age bucket at least this.
    pub thr: u32,
    /// The `max_wait`-long epoch that `q_cur` counts.
    pub q_epoch: u32,
    /// Clients that joined the line in this epoch and the previous one.
    pub q_cur: u32,
    pub q_prev: u32,
}
const _: () = assert!(size_of::<LineState>() == 96);

/// A rule's line parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineRule {
    /// One second of the group's budget (rate per second, at least 1).
    pub rate_per_s: u32,
    /// Most clients a group keeps in the line (joins over the last `max_wait`..2·`max_wait`).
    pub queue_cap: u32,
    /// A client's place is released after this long: its next knock is admitted if the
    /// budget allows at that moment (as under `drop`), else it starts again.
    pub max_wait_ns: u64,
}

/// What the data plane found about the SYN before asking the line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// Not seen (or not looked up because the group is quiet).
    Unknown,
    /// Its probe matches: this is a retransmission of a SYN first seen then.
    Probed { first_seen_ns: u64 },
    /// It is in the line since then.
    Waiting { first_seen_ns: u64 },
}

/// What the data plane must remember after a refused SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remember {
    /// Nothing new (a waiter's knock).
    Nothing,
    /// Write the probe with first-seen = now (and forget a stale waiter, if any).
    Probe,
    /// Add the client to the line with this first-seen time.
    Waiter { first_seen_ns: u64 },
}

/// The line's decision for one SYN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admitted without waiting (the group was not congested).
    Admit,
    /// Admitted after waiting `wait_ns` since its first SYN (forget the waiter).
    AdmitAfterWait { wait_ns: u64 },
    /// Dropped; the client keeps (or takes) its place.
    Defer { remember: Remember },
    /// Dropped; a proven client could not join: the group's line is full.
    QueueFull,
}

impl LineState {
    /// Nothing to look up: not congested and nobody joined the line recently.
    #[inline(always)]
    pub fn quiet(&self, now: u64) -> bool {
        now >= self.congested_until_ns && self.q_cur == 0 && self.q_prev == 0
    }

    /// Start a new second: the threshold comes from the last one's histogram.
    #[inline(always)]
    fn roll(&mut self, now: u64, rate_per_s: u32) {
        let sec = now / NS_PER_SEC;
        if sec == self.sec {
            return;
        }
        self.thr = if sec == self.sec.wrapping_add(1) {
            threshold(&self.hist, rate_per_s)
        } else {
            0
        };
        self.hist = [0; AGE_BUCKETS];
        self.sec = sec;
    }

    /// Count a client joining the line, if the group's cap allows.
    #[inline(always)]
    fn join(&mut self, now: u64, rule: &LineRule) -> bool {
        let epoch_len = if rule.max_wait_ns == 0 {
            NS_PER_SEC
        } else {
            rule.max_wait_ns
        };
        let epoch = (now / epoch_len) as u32;
        if epoch != self.q_epoch {
            self.q_prev = if epoch == self.q_epoch.wrapping_add(1) {
                self.q_cur
            } else {
                0
            };
            self.q_cur = 0;
            self.q_epoch = epoch;
        }
        if self.q_cur.saturating_add(self.q_prev) >= rule.queue_cap {
            return false;
        }
        self.q_cur = self.q_cur.saturating_add(1);
        true
    }

    #[inline(always)]
    fn congest(&mut self, now: u64) {
        self.congested_until_ns = now.saturating_add(CONGESTION_HOLD_NS);
    }
}

/// Upper bounds (exclusive, in seconds) of the age buckets but the last.
pub const AGE_BOUNDS_S: [u64; AGE_BUCKETS - 1] =
    [1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 19, 24, 30, 38, 48];

/// The age bucket of a wait.
#[inline(always)]
pub fn age_bucket(age_ns: u64) -> usize {
    let s = age_ns / NS_PER_SEC;
    let mut i = 0;
    while i < AGE_BOUNDS_S.len() {
        if s < AGE_BOUNDS_S[i] {
            return i;
        }
        i += 1;
    }
    AGE_BUCKETS - 1
}

/// The oldest bucket that, with the older ones, held one second of budget (0 if none).
#[inline(always)]
pub fn threshold(hist: &[u32; AGE_BUCKETS], rate_per_s: u32) -> u32 {
    let mut acc: u32 = 0;
    let mut b = AGE_BUCKETS;
    while b > 0 {
        b -= 1;
        acc = acc.saturating_add(hist[b]);
        if acc >= rate_per_s {
            return b as u32;
        }
    }
    0
}

/// Decide one SYN of a `defer` rule's group. `admit(reserve)` takes from the budget
/// (group and ceiling), leaving `reserve` admissions of the group's burst untouched; it
/// is called at most once.
#[inline(always)]
pub fn knock(
    line: &mut LineState,
    rule: &LineRule,
    known: Known,
    now: u64,
    admit: impl FnOnce(u64) -> Verdict,
) -> Decision {
    let congested = now < line.congested_until_ns;
    let (first_seen_ns, proven_now) = match known {
        Known::Unknown => return first_syn(line, congested, now, admit),
        Known::Probed { first_seen_ns } => (first_seen_ns, true),
        Known::Waiting { first_seen_ns } => (first_seen_ns, false),
    };
    if first_seen_ns > now {
        return first_syn(line, congested, now, admit);
    }
    let age = now - first_seen_ns;
    if age > rule.max_wait_ns {
        // Its place is released. It is still a proven client (older than anyone in
        // line), so this knock gets what `drop` would give it; if the budget is spent
        // it starts again.
        if admit(0) == Verdict::Admit {
            return Decision::AdmitAfterWait { wait_ns: age };
        }
        line.congest(now);
        return Decision::Defer {
            remember: Remember::Probe,
        };
    }
    line.roll(now, rule.rate_per_s);
    let bucket = age_bucket(age);
    if let Some(h) = line.hist.get_mut(bucket) {
        *h = h.saturating_add(1);
    }
    // Knocks in the threshold's own bucket (the crowded one) leave the last RESERVE
    // admissions of the burst to older knocks: those come seldom (Linux waits 8–32 s
    // between its late retransmissions) and must not find the budget just taken.
    let reserve = if congested && bucket as u32 == line.thr {
        RESERVE
    } else {
        0
    };
    if (!congested || bucket as u32 >= line.thr) && admit(reserve) == Verdict::Admit {
        return Decision::AdmitAfterWait { wait_ns: age };
    }
    line.congest(now);
    if !proven_now {
        return Decision::Defer {
            remember: Remember::Nothing,
        };
    }
    if line.join(now, rule) {
        Decision::Defer {
            remember: Remember::Waiter { first_seen_ns },
        }
    } else {
        Decision::QueueFull
    }
}

/// A SYN the line does not know: admitted if the group is not congested and the budget
/// allows, else it must prove itself.
#[inline(always)]
fn first_syn(
    line: &mut LineState,
    congested: bool,
    now: u64,
    admit: impl FnOnce(u64) -> Verdict,
) -> Decision {
    if !congested && admit(0) == Verdict::Admit {
        return Decision::Admit;
    }
    line.congest(now);
    Decision::Defer {
        remember: Remember::Probe,
    }
}

/// Hash of a SYN's identity (addresses, ports, ISN) as 32-bit words: the probe slot is
/// `hash & (slots − 1)`, the tag `(hash >> 32) | 1` (never 0, the empty slot).
#[inline(always)]
pub fn probe_hash(words: &[u32; 10]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    let mut i = 0;
    while i < words.len() {
        h = (h ^ u64::from(words[i])).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
        i += 1;
    }
    h
}

/// The tag stored in a probe slot for `hash`.
#[inline(always)]
pub const fn probe_tag(hash: u64) -> u32 {
    ((hash >> 32) as u32) | 1
}

#[cfg(test)]
#[path = "line/tests.rs"]
mod tests;
