//! Builds the XDP program (`shaper-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker; `src/lib.rs` embeds the object (`EBPF_OBJECT`). `cargo
//! xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "shaper-ebpf")
        .ok_or_else(|| anyhow!("shaper-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("shaper-ebpf manifest has no parent directory"))?
        .as_str();
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).context(
        "building the XDP program failed; run `cargo xtask setup` to install the nightly \
         toolchain's rust-src and bpf-linker",
    )
}
