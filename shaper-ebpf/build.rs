//! Code generation options for bpf-linker (LLVM 22): x86-64 and arm64 kernels accept
//! misaligned packet loads, so header fields are read with one load each instead of
//! byte by byte. The verifier still refuses misaligned stack accesses, and the program
//! makes none (every stack object is naturally aligned).
fn main() {
    println!("cargo::rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
