//! Privileged test support: the real XDP program under BPF_PROG_TEST_RUN, packet
//! builders, and the network-namespace testbed with its traffic generators (reused by
//! `cargo xtask demo` and `cargo xtask bench`).

pub mod crowd;
pub mod dashboard;
pub mod flood;
pub mod floodbench;
pub mod http;
pub mod netfilter;
pub mod netns;
pub mod packets;
pub mod progrun;
pub mod prometheus;
pub mod stacks;
pub mod storm;
pub mod sweep;
pub mod tcp;
pub mod testbed;
