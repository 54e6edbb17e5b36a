//! Writes seed inputs for the fuzz targets (`fuzz/run.sh`): a quantizer checkpoint of the
//! configuration the `checkpoint` target loads into, and compressed streams (format versions 1
//! and 2) for the models the `stream` target decodes with.
//!
//! ```sh
//! cargo run -p rvq-burn --example fuzz_seeds -- fuzz/corpus
//! ```

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use rvq_burn::coding::ABSENT;
use rvq_burn::{CodebookRule, EmaResidualVectorQuantizerConfig, EntropyModels};

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let device = Device::flex().autodiff();
    // fuzz_targets/checkpoint.rs loads into this configuration.
    let rvq = EmaResidualVectorQuantizerConfig::new(2, 8.into(), 4).init(&device);
    let _ = rvq.forward(Tensor::<2>::random([64, 4], Distribution::Default, &device));
    rvq.sync_state();
    std::fs::create_dir_all(dir.join("checkpoint")).expect("corpus directory");
    rvq.save_file(dir.join("checkpoint/trained.bpk"))
        .expect("checkpoint written");

    // fuzz_targets/stream.rs decodes with these models.
    let skewed: Vec<f32> = (0..16).map(|k| (1u32 << (15 - k)) as f32).collect();
    let models = EntropyModels::from_counts(
        &[skewed, vec![3.0; 5], vec![1.0]],
        CodebookRule::Laplace,
        1e-5,
        2,
    )
    .expect("valid counts");
    std::fs::create_dir_all(dir.join("stream")).expect("corpus directory");
    for (name, indices, shape) in [
        (
            "three-levels",
            vec![vec![0, 1, 0, 15], vec![4, 0, 2, 1], vec![0; 4]],
            vec![2, 2, 2],
        ),
        ("one-level", vec![vec![3, 0, 0]], vec![3, 2]),
        // Format version 2: vectors that stop after 1, 2 and 3 levels.
        (
            "depths",
            vec![
                vec![0, 1, 0, 15],
                vec![4, ABSENT, 2, 1],
                vec![0, ABSENT, ABSENT, 0],
            ],
            vec![2, 2, 2],
        ),
    ] {
        let bytes = models.compress(&indices, &shape).expect("valid codes");
        std::fs::write(dir.join(format!("stream/{name}.rvqz")), bytes).expect("stream written");
    }
    println!("seeds written to {}", dir.display());
}
