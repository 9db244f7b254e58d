//! shaper: an XDP new-connection shaper. The binary (`main.rs`) is the daemon and the
//! CLI; this library holds their parts so the privileged tests can use the same code.

pub mod attach;
pub mod bpfsys;
pub mod control;
pub mod counters;
pub mod dataplane;
pub mod mapmem;
pub mod pins;
pub mod policy;

/// The XDP program, built by `build.rs` from `shaper-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shaper"));
