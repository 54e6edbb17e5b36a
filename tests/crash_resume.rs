//! A run killed while it saves a checkpoint resumes, and loses nothing but the unfinished
//! epoch.
//!
//! Its own harness (`harness = false`): the test starts this binary again as a child that
//! trains and is killed (`abort`, as by a signal: no destructor, no flush) at one point of
//! committing epoch 2 (`vqvae_demo::checkpoint::ABORT_ENV`); then it resumes the run in this
//! process and compares every record with an uninterrupted run's.

use std::path::{Path, PathBuf};
use std::process::Command;

use vqvae_demo::checkpoint::{self, ABORT_ENV};
use vqvae_demo::data::Mnist;
use vqvae_demo::metrics::{self, EpochRecord};
use vqvae_demo::training::{RunOptions, TrainingConfig, train};

/// Set in the child: the output directory to train into.
const CHILD_ENV: &str = "VQVAE_CRASH_TEST_CHILD_OUT";
const EPOCHS: usize = 3;

fn config(epochs: usize) -> TrainingConfig {
    let mut config = TrainingConfig::new()
        .with_epochs(epochs)
        .with_batch_size(32)
        .with_learning_rate(3e-3)
        .with_train_limit(Some(96))
        .with_valid_limit(Some(32));
    config.model.quantizer.num_levels = 2;
    config.model.quantizer.num_embeddings = 16.into();
    config
}

fn options(out: &Path, resume: bool) -> RunOptions {
    RunOptions {
        out: out.to_path_buf(),
        resume,
        devices: vec![burn::tensor::Device::flex()],
        verbose: false,
    }
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vqvae-crash-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Everything but wall times.
fn assert_same_training(got: &[EpochRecord], want: &[EpochRecord], stage: &str) {
    assert_eq!(got.len(), want.len(), "{stage}: epochs");
    for (got, want) in got.iter().zip(want) {
        let mut got = got.clone();
        got.train_seconds = want.train_seconds;
        got.images_per_second = want.images_per_second;
        assert_eq!(&got, want, "{stage}: epoch {}", want.epoch);
    }
}

fn main() {
    let data = Mnist::embedded();
    if let Ok(out) = std::env::var(CHILD_ENV) {
        // The child: trains until the abort point kills it.
        let _ = train(&config(EPOCHS), &data, &options(Path::new(&out), false));
        eprintln!("the child was not killed");
        std::process::exit(3);
    }

    let full = out_dir("full");
    train(&config(EPOCHS), &data, &options(&full, false)).expect("uninterrupted run");
    let want = metrics::read(&full.join("metrics.jsonl")).unwrap();
    assert_eq!(want.len(), EPOCHS);

    // (where the child is killed while committing epoch 2, the last complete epoch after it)
    let stages = [
        ("model", 1),
        ("optimizer", 1),
        ("metrics-cut", 1),
        ("metrics", 1),
        ("marker", 2),
    ];
    let me = std::env::current_exe().expect("the test binary's path");
    for (stage, complete) in stages {
        let out = out_dir(stage);
        let status = Command::new(&me)
            .env(CHILD_ENV, &out)
            .env(ABORT_ENV, format!("{stage}:2"))
            .status()
            .expect("the child starts");
        assert!(
            !status.success() && status.code() != Some(3),
            "{stage}: the child was not killed ({status})"
        );
        assert_eq!(
            checkpoint::last_epoch(&out).unwrap(),
            Some(complete),
            "{stage}: the last complete epoch"
        );
        train(&config(EPOCHS), &data, &options(&out, true)).expect("the resumed run");
        let got = metrics::read(&out.join("metrics.jsonl")).unwrap();
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), EPOCHS, "{stage}: a line per epoch");
        assert_same_training(&got, &want, stage);
        println!("killed after {stage} of epoch 2: resumed from epoch {complete}, same records");
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&full);
    println!("test crash_resume ... ok ({} kill points)", stages.len());
}
