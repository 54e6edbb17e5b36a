//! `OUT/metrics.jsonl`: one [`EpochRecord`] per epoch, the same schema on one device or
//! several.

use std::fs;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::DemoError;
use crate::evaluation::Validation;

/// One line of `OUT/metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Devices the epoch trained on.
    pub devices: usize,
    /// Mean training loss (reconstruction + commitment) over the epoch's steps.
    pub train_loss: f64,
    /// Mean pixel MSE over the epoch's steps.
    pub train_mse: f64,
    /// Mean commitment loss over the epoch's steps.
    pub train_commitment: f64,
    /// Mean over steps of the per-batch mean perplexity over levels.
    pub train_perplexity_mean: f64,
    /// Codes restarted by the dead-code check during the epoch, per level.
    pub train_restarted_codes: Vec<usize>,
    /// After the epoch, per level: entropy of the EMA counts / log K (batch-independent).
    pub ema_entropy: Vec<f64>,
    /// After the epoch, per level: share of codes alive by their EMA counts.
    pub ema_active_share: Vec<f64>,
    /// Wall time of the epoch's training steps.
    pub train_seconds: f64,
    /// Training images per second, all devices together.
    pub images_per_second: f64,
    /// Validation figures.
    #[serde(flatten)]
    pub validation: Validation,
}

/// Appends `record` as one line.
pub fn append(path: &Path, record: &EpochRecord) -> Result<(), DemoError> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| DemoError::io(path, e))?;
    let line = serde_json::to_string(record).expect("records serialize");
    writeln!(file, "{line}").map_err(|e| DemoError::io(path, e))
}

/// Every complete record of the file; a missing file has none. A line that does not parse
/// (the end of a line cut by a killed run) is skipped.
pub fn read(path: &Path) -> Result<Vec<EpochRecord>, DemoError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DemoError::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// Keeps the records of epochs up to `last_epoch` (those a resume from that checkpoint
/// keeps) and drops the rest, cut lines included.
pub fn truncate(path: &Path, last_epoch: usize) -> Result<(), DemoError> {
    let kept: Vec<EpochRecord> = read(path)?
        .into_iter()
        .filter(|record| record.epoch <= last_epoch)
        .collect();
    let mut body = String::new();
    for record in &kept {
        body.push_str(&serde_json::to_string(record).expect("records serialize"));
        body.push('\n');
    }
    fs::write(path, body).map_err(|e| DemoError::io(path, e))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// f64s that serde_json's default parser reads back off by one bit (the two seen in a
    /// failed resume test), the extremes, and many arbitrary bit patterns.
    pub(crate) fn awkward_floats() -> Vec<f64> {
        let mut values = vec![
            0.20794587941297019,
            0.12329578816813107,
            0.1 + 0.2,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            -1.0 / 3.0,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        while values.len() < 4000 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let value = f64::from_bits(state);
            if value.is_finite() {
                values.push(value);
            }
        }
        values
    }

    fn record(epoch: usize, v: &[f64]) -> EpochRecord {
        EpochRecord {
            epoch,
            devices: 1,
            train_loss: v[0],
            train_mse: v[1 % v.len()],
            train_commitment: v[2 % v.len()],
            train_perplexity_mean: v[3 % v.len()],
            train_restarted_codes: vec![epoch],
            ema_entropy: v.to_vec(),
            ema_active_share: vec![v[4 % v.len()]],
            train_seconds: v[5 % v.len()],
            images_per_second: v[6 % v.len()],
            validation: Validation {
                val_mse: v[7 % v.len()],
                val_psnr_db: v[0],
                val_usage: v.to_vec(),
                val_perplexity: v.to_vec(),
                val_bits_per_vector: v[1 % v.len()],
                val_psnr_db_by_levels: v.to_vec(),
                code_histograms: Vec::new(),
            },
        }
    }

    fn bits(r: &EpochRecord) -> Vec<u64> {
        let mut all = vec![
            r.train_loss,
            r.train_mse,
            r.train_commitment,
            r.train_perplexity_mean,
            r.train_seconds,
            r.images_per_second,
            r.validation.val_mse,
            r.validation.val_psnr_db,
            r.validation.val_bits_per_vector,
        ];
        all.extend(&r.ema_entropy);
        all.extend(&r.ema_active_share);
        all.extend(&r.validation.val_usage);
        all.extend(&r.validation.val_perplexity);
        all.extend(&r.validation.val_psnr_db_by_levels);
        all.into_iter().map(f64::to_bits).collect()
    }

    /// Every f64 a run writes to `metrics.jsonl` reads back bit for bit.
    #[test]
    fn floats_in_metrics_read_back_bit_for_bit() {
        let dir = std::env::temp_dir().join(format!("vqvae-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = fs::remove_file(&path);
        let values = awkward_floats();
        let records: Vec<EpochRecord> = values
            .chunks(8)
            .enumerate()
            .map(|(epoch, v)| record(epoch, v))
            .collect();
        for record in &records {
            append(&path, record).unwrap();
        }
        let read_back = read(&path).unwrap();
        assert_eq!(read_back.len(), records.len());
        for (got, want) in read_back.iter().zip(&records) {
            assert_eq!(bits(got), bits(want), "epoch {}", want.epoch);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// A line cut short by a killed run is dropped by `read` and by `truncate`, which keeps
    /// the epochs up to the checkpoint.
    #[test]
    fn a_cut_line_is_dropped_and_truncate_keeps_the_checkpointed_epochs() {
        let dir = std::env::temp_dir().join(format!("vqvae-metrics-cut-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        let _ = fs::remove_file(&path);
        assert!(read(&path).unwrap().is_empty());
        let records: Vec<EpochRecord> = (1..=3).map(|e| record(e, &[e as f64; 8])).collect();
        for record in &records {
            append(&path, record).unwrap();
        }
        let whole = serde_json::to_string(&record(4, &[4.0; 8])).unwrap();
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&whole.as_bytes()[..whole.len() / 2])
            .unwrap();
        drop(file);
        assert_eq!(read(&path).unwrap(), records);
        truncate(&path, 2).unwrap();
        assert_eq!(read(&path).unwrap(), records[..2].to_vec());
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        let _ = fs::remove_dir_all(&dir);
    }
}
