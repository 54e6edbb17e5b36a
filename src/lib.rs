//! The workspace root of rvq-burn: it holds the runnable example
//! (`cargo run --release --example train`) and the end-to-end tests. The code lives in
//! `crates/rvq-burn` (the quantizer) and `crates/vqvae-demo` (the demo).
//!
//! The README follows; its Rust examples are compiled and run as doctests.
#![doc = include_str!("../README.md")]
