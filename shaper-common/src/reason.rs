//! Why the program let a packet through or dropped it. Every exit path of the XDP
//! program bumps exactly one [`Reason`] in the per-CPU global counters; attempts that
//! matched a rule also bump one [`Outcome`] in that rule's counters.

/// Index into the global per-CPU counter array (`GLOBAL_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not IPv4/IPv6 (ARP, LLDP, …), behind at most two VLAN tags.
    NotIp = 0,
    /// A header ends past the end of the frame.
    Truncated = 1,
    /// A header is inconsistent (IP version, IHL < 5, TCP data offset < 5).
    Malformed = 2,
    /// A non-first IP fragment: it carries no TCP header.
    Fragment = 3,
    /// IP but not TCP (UDP, ICMP, ESP, no next header, …).
    NotTcp = 4,
    /// TCP but not a new-connection attempt (anything but SYN without ACK).
    NotAttempt = 5,
    /// More IPv6 extension headers than the program walks.
    ExtHdrLimit = 6,
    /// A new-connection attempt that no rule covers.
    NoRule = 7,
    /// A new-connection attempt from a protected prefix or to a protected port.
    Protected = 8,
    /// An attempt admitted by its rule (within budget, or action `allow`).
    Admitted = 9,
    /// An attempt over budget, dropped (`drop`).
    Dropped = 10,
    /// An attempt over budget under `monitor`: counted, passed.
    WouldDrop = 11,
    /// Over budget because the shared state stayed contended for every retry; dropped
    /// (never admitted: the budget is exact).
    Contended = 12,
    /// An attempt over budget under `defer`, dropped; the client keeps or takes its
    /// place in the waiting line.
    Deferred = 13,
    /// A waiting client's retransmission, admitted in its turn.
    AdmittedAfterWait = 14,
    /// Over budget under `defer`, dropped without a place: the group's line is full.
    QueueFull = 15,
}

impl Reason {
    /// Number of reasons (size of `GLOBAL_STATS`).
    pub const COUNT: u32 = 16;

    /// All reasons, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::NotIp,
        Reason::Truncated,
        Reason::Malformed,
        Reason::Fragment,
        Reason::NotTcp,
        Reason::NotAttempt,
        Reason::ExtHdrLimit,
        Reason::NoRule,
        Reason::Protected,
        Reason::Admitted,
        Reason::Dropped,
        Reason::WouldDrop,
        Reason::Contended,
        Reason::Deferred,
        Reason::AdmittedAfterWait,
        Reason::QueueFull,
    ];

    /// The name used in `shaper stats` and Prometheus labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::NotIp => "not_ip",
            Reason::Truncated => "truncated",
            Reason::Malformed => "malformed",
            Reason::Fragment => "fragment",
            Reason::NotTcp => "not_tcp",
            Reason::NotAttempt => "not_attempt",
            Reason::ExtHdrLimit => "ext_hdr_limit",
            Reason::NoRule => "no_rule",
            Reason::Protected => "protected",
            Reason::Admitted => "admitted",
            Reason::Dropped => "dropped",
            Reason::WouldDrop => "would_drop",
            Reason::Contended => "contended",
            Reason::Deferred => "deferred",
            Reason::AdmittedAfterWait => "admitted_after_wait",
            Reason::QueueFull => "queue_full",
        }
    }
}

/// Index into a rule's counters ([`crate::maps::RuleStats::counts`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// SYN admitted (within budget, or action `allow`).
    Admitted = 0,
    /// SYN dropped over budget (`drop`, or `defer` when the line is full or disabled).
    Dropped = 1,
    /// SYN dropped while its client waits in line (`defer`).
    Deferred = 2,
    /// Clients admitted after waiting in line, once each (`defer`).
    AdmittedAfterWait = 3,
    /// SYN dropped because the waiting line was full (`defer`).
    QueueFull = 4,
    /// SYN over budget under `monitor`: passed, counted.
    WouldDrop = 5,
    /// SYN from a protected prefix or to a protected port inside this rule's prefix.
    Protected = 6,
}

impl Outcome {
    /// Number of outcomes.
    pub const COUNT: usize = 7;

    /// All outcomes, in index order.
    pub const ALL: [Outcome; Self::COUNT] = [
        Outcome::Admitted,
        Outcome::Dropped,
        Outcome::Deferred,
        Outcome::AdmittedAfterWait,
        Outcome::QueueFull,
        Outcome::WouldDrop,
        Outcome::Protected,
    ];

    /// The name used in `shaper stats` and Prometheus labels.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Dropped => "dropped",
            Outcome::Deferred => "deferred",
            Outcome::AdmittedAfterWait => "admitted_after_wait",
            Outcome::QueueFull => "queue_full",
            Outcome::WouldDrop => "would_drop",
            Outcome::Protected => "protected",
        }
    }

    /// The column header in `shaper stats`.
    pub const fn header(self) -> &'static str {
        match self {
            Outcome::Admitted => "ADMITTED",
            Outcome::Dropped => "DROPPED",
            Outcome::Deferred => "DEFERRED",
            Outcome::AdmittedAfterWait => "AFTER WAIT",
            Outcome::QueueFull => "QUEUE FULL",
            Outcome::WouldDrop => "WOULD DROP",
            Outcome::Protected => "PROTECTED",
        }
    }
}
