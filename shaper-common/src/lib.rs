//! Types shared between the XDP program and the daemon, and the pure admission logic.
//!
//! Everything here is `no_std`, integer-only and panic-free: the eBPF program calls these
//! functions, and the host tests (unit and property tests) check their invariants.
#![no_std]

#[cfg(any(test, feature = "user"))]
extern crate std;

pub mod budget;
#[cfg(any(test, feature = "user"))]
pub mod fairness;
pub mod group;
pub mod jiffies;
pub mod knocks;
pub mod line;
pub mod maps;
pub mod reason;
pub mod table;

pub use budget::{Budget, Take, TatCell, Verdict, admit, admit_two_clocks};
pub use group::{group_v4, group_v6};
pub use reason::{Outcome, Reason};
