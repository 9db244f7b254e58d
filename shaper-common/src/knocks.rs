//! A waiting client's knocks (its SYN retransmissions), and when its next one will come.
//!
//! Every TCP stack retransmits an unanswered SYN on a schedule of its own, and the
//! schedules are few and known:
//!
//! | stack | SYNs at (s after the first) | gives up |
//! |---|---|---|
//! | Linux 6.x defaults | 0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67 | ~131 s |
//! | older Linux (`tcp_syn_linear_timeouts = 0`) | 0, 1, 3, 7, 15, 31, 63 | ~127 s |
//! | Windows (initial RTO 3 s, 2 retries) | 0, 3, 9 | 21 s |
//! | macOS/iOS | 0, 1, 2, 3, 4, 5, 7, 11, 19, 35 | ~75 s |
//!
//! So the gaps are one second for a while (up to five of them), or three seconds then
//! six (Windows), or they double. From a client's knocks so far the line tells which,
//! and predicts its next knock: the time it typically comes (the nominal gap plus how
//! late the kernel's timers typically fire after a gap that long, [`typical_late_ns`]),
//! and whether it is the client's last. After a first gap of one second
//! the stack is not known yet: the next gap is one second (Linux 6.x, macOS) or two
//! (older Linux). Both knock two seconds later (the linear ones once more in between),
//! so that is the prediction (the line takes an expected knock back whenever the
//! client knocks, and expects the next one if it still waits). A stack that fits none of these still backs
//! off by doubling, which is what is predicted for it.

const S: u64 = 1_000_000_000;

/// Gaps up to this long are "one second" (the linear phase); a timer is late by a few
/// tens of ms at most there.
const ONE_MAX_NS: u64 = 1_500_000_000;
/// A first gap this long or more is a stack with a 3-s initial timeout (Windows): its
/// second gap is twice that, and its third SYN is its last.
const SLOW_FIRST_NS: u64 = 2_500_000_000;
/// The initial timeout of such a stack (Windows', and RFC 2988's).
const SLOW_INITIAL_NS: u64 = 3 * S;
/// Linux 6.x sends five SYNs one second apart after the first.
const LINEAR_GAPS: u8 = 5;
/// After a gap of about 32 s, no stack knocks again (Linux gives up 64 s later).
const LAST_GAP_NS: u64 = 24 * S;

/// How late a retransmission timer of `gap_ns` typically fires, in ns, on Linux at
/// HZ=250 (Debian's and Ubuntu's kernels). Linux's timer wheel files a timer in a
/// level chosen by its timeout, each level 8 times as coarse as the one before (4 ms,
/// 32 ms, 256 ms, 2 s at HZ=250), and fires it at the first boundary of that level
/// after its expiry. A retransmission is sent from the timer, on a boundary of the
/// level its own timeout used, so most gaps come out the same every time:
///
/// | gap | fires at | late by |
/// |---|---|---|
/// | 1 s after a knock | 1.024 s | 24 ms (4–32 ms after the first SYN) |
/// | 2 s | 2.016 s | 16 ms |
/// | 4 s | 4.032–4.256 s | 32–256 ms, depending on the jiffy |
/// | 6 s (Windows' second) | 6.144 s | 144 ms |
/// | 8 s | 8.192 s | 192 ms |
/// | 16 s | 16.128 s | 128 ms |
/// | 32 s | 32.256–34.048 s | 256 ms to 2 s |
///
/// These match the SYNs captured from real kernel clients in the end-to-end storms;
/// where the lateness depends on the jiffy, the middle of its range. Predicting the
/// typical time rather than the earliest matters with a small burst: the budget
/// overflows within a fraction of a second, and a client expected at its earliest time
/// but coming 200 ms later would hold back a token that overflows before it arrives.
#[inline(always)]
pub const fn typical_late_ns(gap_ns: u64) -> u64 {
    const MS: u64 = 1_000_000;
    if gap_ns < 3 * S / 2 {
        24 * MS
    } else if gap_ns < 5 * S / 2 {
        16 * MS
    } else if gap_ns < 7 * S {
        144 * MS
    } else if gap_ns < 12 * S {
        192 * MS
    } else if gap_ns < 24 * S {
        128 * MS
    } else {
        1152 * MS
    }
}

/// What the stack looks like so far.
pub mod kind {
    /// One gap seen (the proof), of one second: linear or doubling.
    pub const UNKNOWN: u8 = 0;
    /// Gaps of one second (Linux 6.x, macOS), then doubling.
    pub const LINEAR: u8 = 1;
    /// Doubling (older Linux, and any stack that fits nothing else).
    pub const DOUBLING: u8 = 2;
    /// A 3-s first gap: one more knock, twice as far, and it is the last (Windows).
    pub const SLOW: u8 = 3;
    /// A [`SLOW`] stack after its last knock.
    pub const SLOW_DONE: u8 = 4;
}

/// A waiting client's knocks so far: kept in its waiter entry, updated at every knock.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Knocks {
    /// When its first SYN was seen (monotonic ns): its place in line.
    pub first_seen_ns: u64,
    /// Its latest knock, in ms after the first SYN.
    pub last_ms: u32,
    /// The gap before the latest knock, in ms (saturating).
    pub gap_ms: u16,
    /// Gaps of about one second so far.
    pub ones: u8,
    /// One of [`kind`].
    pub kind: u8,
}
const _: () = assert!(size_of::<Knocks>() == 16);

/// The next knock a client is expected to make.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// When it typically comes (monotonic ns); 0: not predicted (the latest knock was
    /// the last).
    pub at: u64,
    /// Whether that knock will be the client's last.
    pub last: bool,
}

/// The power of two seconds nearest to `gap_ns` (as ns), from 1 s to 64 s.
#[inline(always)]
const fn pow2_gap(gap_ns: u64) -> u64 {
    let mut p = S;
    let mut i = 0;
    while i < 6 {
        // 1.5·p is the midpoint between p and 2p.
        if gap_ns < p + p / 2 {
            return p;
        }
        p *= 2;
        i += 1;
    }
    p
}

impl Knocks {
    /// A client proven at `now` by the retransmission of its first SYN, seen at
    /// `first_seen_ns`.
    #[inline(always)]
    pub const fn proof(first_seen_ns: u64, now: u64) -> Knocks {
        let gap = now.saturating_sub(first_seen_ns);
        let (kind, ones) = if gap >= SLOW_FIRST_NS {
            (kind::SLOW, 0)
        } else if gap < ONE_MAX_NS {
            (kind::UNKNOWN, 1)
        } else {
            (kind::DOUBLING, 0)
        };
        Knocks {
            first_seen_ns,
            last_ms: ms(gap),
            gap_ms: gap_ms(gap),
            ones,
            kind,
        }
    }

    /// When the latest knock was (monotonic ns).
    #[inline(always)]
    pub const fn last_ns(&self) -> u64 {
        self.first_seen_ns
            .saturating_add((self.last_ms as u64).saturating_mul(1_000_000))
    }

    /// Another knock, at `now`.
    #[inline(always)]
    pub const fn observe(&mut self, now: u64) {
        let gap = now.saturating_sub(self.last_ns());
        let one = gap < ONE_MAX_NS;
        self.kind = match self.kind {
            kind::UNKNOWN if one => kind::LINEAR,
            kind::UNKNOWN => kind::DOUBLING,
            kind::SLOW | kind::SLOW_DONE => kind::SLOW_DONE,
            k => k,
        };
        if one {
            self.ones = self.ones.saturating_add(1);
        }
        self.gap_ms = gap_ms(gap);
        self.last_ms = ms(now.saturating_sub(self.first_seen_ns));
    }

    /// Was the latest knock the client's last (none is expected after it)?
    #[inline(always)]
    pub const fn is_last(&self) -> bool {
        match self.kind {
            kind::SLOW_DONE => true,
            kind::SLOW | kind::UNKNOWN => false,
            _ => self.next_gap() > 2 * LAST_GAP_NS,
        }
    }

    /// The gap to the next knock of a linear or doubling stack.
    #[inline(always)]
    const fn next_gap(&self) -> u64 {
        if self.kind == kind::LINEAR && self.ones < LINEAR_GAPS {
            S
        } else {
            pow2_gap(self.gap_ms as u64 * 1_000_000) * 2
        }
    }

    /// The next knock expected after the latest one (for a stack not known yet, the
    /// one two seconds on: see the module's doc).
    #[inline(always)]
    pub const fn next(&self) -> Next {
        let last = self.last_ns();
        match self.kind {
            // Its 3-s timer doubled, late as a 6-s timer is (not twice the first gap
            // as measured: that doubles the first timer's lateness, which depends on
            // the jiffy the first SYN was sent in).
            kind::SLOW => Next {
                at: last.saturating_add(2 * SLOW_INITIAL_NS + typical_late_ns(2 * SLOW_INITIAL_NS)),
                last: true,
            },
            kind::UNKNOWN => Next {
                at: last.saturating_add(2 * S + typical_late_ns(2 * S)),
                last: false,
            },
            kind::SLOW_DONE => Next { at: 0, last: false },
            _ => {
                let g = self.next_gap();
                if g > 2 * LAST_GAP_NS {
                    Next { at: 0, last: false }
                } else {
                    Next {
                        at: last.saturating_add(g + typical_late_ns(g)),
                        last: g >= LAST_GAP_NS,
                    }
                }
            }
        }
    }
}

#[inline(always)]
const fn ms(ns: u64) -> u32 {
    let m = ns / 1_000_000;
    if m > u32::MAX as u64 {
        u32::MAX
    } else {
        m as u32
    }
}

#[inline(always)]
const fn gap_ms(ns: u64) -> u16 {
    let m = ns / 1_000_000;
    if m > u16::MAX as u64 {
        u16::MAX
    } else {
        m as u16
    }
}

#[cfg(test)]
#[path = "knocks/tests.rs"]
mod tests;
