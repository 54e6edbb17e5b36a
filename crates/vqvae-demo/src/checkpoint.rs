//! Checkpoints in `OUT/checkpoint/`: the model and the optimizer after each epoch, committed
//! so that a run killed at any moment resumes from its last complete epoch.
//!
//! An epoch is committed in this order: `model-E.bpk` and `optim-E.bpk` (each written to a
//! temporary file and renamed into place by Burn's writer), the epoch's line of
//! `metrics.jsonl`, then the marker `last_epoch` (written to `last_epoch.tmp` and renamed).
//! The marker names the last epoch whose files are all complete; `--resume` starts there and
//! drops any later line of `metrics.jsonl`. A kill before the rename loses only the
//! unfinished epoch.

use std::fs;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;

use crate::error::DemoError;
use crate::metrics::{self, EpochRecord};
use crate::model::VqVae;

/// Environment variable for the crash test: `STAGE:EPOCH` aborts the process while epoch
/// `EPOCH` is being committed, right after `STAGE` (`model`, `optimizer`, `metrics-cut`: half
/// of the metrics line written, `metrics`, `marker`).
pub const ABORT_ENV: &str = "VQVAE_DEMO_ABORT_IN_SAVE";

/// `OUT/checkpoint`.
pub fn dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

fn model_file(out: &Path, epoch: usize) -> PathBuf {
    dir(out).join(format!("model-{epoch}.bpk"))
}

fn optimizer_file(out: &Path, epoch: usize) -> PathBuf {
    dir(out).join(format!("optim-{epoch}.bpk"))
}

/// The last epoch whose checkpoint is complete, from `OUT/checkpoint/last_epoch`.
pub fn last_epoch(out: &Path) -> Result<Option<usize>, DemoError> {
    let marker = dir(out).join("last_epoch");
    if !marker.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&marker).map_err(|e| DemoError::io(&marker, e))?;
    text.trim().parse().map(Some).map_err(|_| {
        DemoError::Checkpoint(format!(
            "{}: not an epoch number: {text:?}",
            marker.display()
        ))
    })
}

/// Aborts here if the crash test asked for it (see [`ABORT_ENV`]).
fn abort_point(stage: &str, epoch: usize) {
    if let Ok(target) = std::env::var(ABORT_ENV)
        && target == format!("{stage}:{epoch}")
    {
        std::process::abort();
    }
}

/// Commits `epoch`: the model and the optimizer, the epoch's `record`, then the marker; keeps
/// the last two checkpoints.
pub fn commit(
    model: &VqVae,
    optimizer: &ModuleOptimizer,
    out: &Path,
    record: &EpochRecord,
) -> Result<(), DemoError> {
    let epoch = record.epoch;
    fs::create_dir_all(dir(out)).map_err(|e| DemoError::io(out, e))?;
    // RunningState defers the last EMA update until read: apply it before saving.
    model.quantizer.sync_state();
    model
        .clone()
        .save_file(model_file(out, epoch))
        .map_err(|e| DemoError::Checkpoint(format!("saving model-{epoch}.bpk: {e}")))?;
    abort_point("model", epoch);
    optimizer
        .save(optimizer_file(out, epoch))
        .map_err(|e| DemoError::Checkpoint(format!("saving optim-{epoch}.bpk: {e}")))?;
    abort_point("optimizer", epoch);
    let metrics_path = out.join("metrics.jsonl");
    if std::env::var(ABORT_ENV).is_ok_and(|t| t == format!("metrics-cut:{epoch}")) {
        let line = serde_json::to_string(record).expect("records serialize");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| DemoError::io(&metrics_path, e))?;
        std::io::Write::write_all(&mut file, &line.as_bytes()[..line.len() / 2])
            .map_err(|e| DemoError::io(&metrics_path, e))?;
        std::process::abort();
    }
    metrics::append(&metrics_path, record)?;
    abort_point("metrics", epoch);
    let marker = dir(out).join("last_epoch");
    let pending = dir(out).join("last_epoch.tmp");
    fs::write(&pending, epoch.to_string()).map_err(|e| DemoError::io(&pending, e))?;
    fs::rename(&pending, &marker).map_err(|e| DemoError::io(&marker, e))?;
    abort_point("marker", epoch);
    if epoch > 2 {
        let _ = fs::remove_file(model_file(out, epoch - 2));
        let _ = fs::remove_file(optimizer_file(out, epoch - 2));
    }
    Ok(())
}

/// Loads the model of `epoch` into `model`.
pub fn load_model(model: VqVae, out: &Path, epoch: usize) -> Result<VqVae, DemoError> {
    let file = model_file(out, epoch);
    model
        .try_load_file(&file)
        .map_err(|e| DemoError::Checkpoint(format!("{}: {e}", file.display())))
}

/// Loads the optimizer state of `epoch` into `optimizer`.
pub fn load_optimizer(
    optimizer: ModuleOptimizer,
    out: &Path,
    epoch: usize,
) -> Result<ModuleOptimizer, DemoError> {
    let file = optimizer_file(out, epoch);
    optimizer
        .load(&file)
        .map_err(|e| DemoError::Checkpoint(format!("{}: {e}", file.display())))
}

/// Forgets any earlier run in `out`: its marker and its metrics (a new run starts over).
pub fn clear(out: &Path) {
    let _ = fs::remove_file(out.join("metrics.jsonl"));
    let _ = fs::remove_file(dir(out).join("last_epoch"));
}
