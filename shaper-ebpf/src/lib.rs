//! The XDP program lives in `main.rs`; it is built for the BPF target by
//! `shaper/build.rs`. This empty library lets `shaper` name the crate as a
//! build-dependency, so cargo rebuilds the program when it changes.
#![no_std]
