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

#[cfg(feature = "crash-hooks")]
pub use self::crash::ABORT_ENV;

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
    crash::abort_point("model", epoch);
    optimizer
        .save(optimizer_file(out, epoch))
        .map_err(|e| DemoError::Checkpoint(format!("saving optim-{epoch}.bpk: {e}")))?;
    crash::abort_point("optimizer", epoch);
    let metrics_path = out.join("metrics.jsonl");
    crash::cut_metrics_line(&metrics_path, record);
    metrics::append(&metrics_path, record)?;
    crash::abort_point("metrics", epoch);
    let marker = dir(out).join("last_epoch");
    let pending = dir(out).join("last_epoch.tmp");
    fs::write(&pending, epoch.to_string()).map_err(|e| DemoError::io(&pending, e))?;
    fs::rename(&pending, &marker).map_err(|e| DemoError::io(&marker, e))?;
    crash::abort_point("marker", epoch);
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

/// The crash test's abort points in the save path (`tests/crash_resume.rs`): compiled in only
/// with the test-only feature `crash-hooks`, no-ops otherwise.
mod crash {
    use std::path::Path;

    use crate::metrics::EpochRecord;

    /// Environment variable for the crash test: `STAGE:EPOCH` aborts the process while epoch
    /// `EPOCH` is being committed, right after `STAGE` (`model`, `optimizer`, `metrics-cut`:
    /// half of the metrics line written, `metrics`, `marker`).
    #[cfg(feature = "crash-hooks")]
    pub const ABORT_ENV: &str = "VQVAE_DEMO_ABORT_IN_SAVE";

    /// Whether the crash test asked to abort at `stage` of committing `epoch`.
    #[cfg(feature = "crash-hooks")]
    fn asked(stage: &str, epoch: usize) -> bool {
        std::env::var(ABORT_ENV).is_ok_and(|target| target == format!("{stage}:{epoch}"))
    }

    /// Aborts here if the crash test asked for it.
    pub(super) fn abort_point(_stage: &str, _epoch: usize) {
        #[cfg(feature = "crash-hooks")]
        if asked(_stage, _epoch) {
            std::process::abort();
        }
    }

    /// Writes half of `record`'s line to `metrics` and aborts, if the crash test asked for it
    /// (`metrics-cut`).
    pub(super) fn cut_metrics_line(_metrics: &Path, _record: &EpochRecord) {
        #[cfg(feature = "crash-hooks")]
        if asked("metrics-cut", _record.epoch) {
            use std::io::Write;
            let line = serde_json::to_string(_record).expect("records serialize");
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(_metrics)
                .expect("the metrics file opens");
            file.write_all(&line.as_bytes()[..line.len() / 2])
                .expect("half a line is written");
            std::process::abort();
        }
    }
}
