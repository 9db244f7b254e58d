//! shaper: an XDP new-connection shaper. The binary (`main.rs`) is the CLI, and `shaper
//! run` the daemon ([`daemon`]); this library holds every part of both, so the
//! privileged tests use the same code. docs/architecture.md maps the modules.

pub mod apply;
pub mod attach;
pub mod batch;
pub mod bpfsys;
pub mod capacity;
pub mod client;
pub mod clock;
pub mod counters;
pub mod daemon;
pub mod dataplane;
pub mod mapmem;
pub mod netlink;
pub mod pins;
pub mod policy;
pub mod protocol;

/// The XDP program, built by `build.rs` from `shaper-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shaper"));

/// The benchmarks' programs (`flood_fan` and `flood_src`, an in-kernel SYN generator,
/// and `flood_drop`, a bare `XDP_DROP`), built with the XDP program from
/// `shaper-ebpf/src/benchgen.rs`. The daemon never loads them (and the `shaper` binary
/// does not link them in).
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/benchgen"));
