//! Trains the VQ-VAE demo on MNIST: `cargo run --release --example train -- --help`.
//!
//! The backend comes from cargo features: the CPU by default, `--features wgpu` for the GPU.

fn main() {
    if let Err(error) = vqvae_demo::run(std::env::args().skip(1)) {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}
