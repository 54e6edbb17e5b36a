//! Training on several devices with Burn's own data parallelism (`--devices N`).
//!
//! Burn 0.22's `SupervisedTraining` with `ExecutionStrategy::multi`: one process, one worker
//! thread per device, each running the training step on its share of the data (Burn gives
//! device `i` the `i`-th slice of the training set, `--batch-size` images per device and
//! step); the gradients are summed on the first device, which runs the optimizer and the
//! validation. The quantizer runs in data-parallel mode
//! ([`EmaResidualVectorQuantizerConfig::data_parallel`]), so that Burn's averaging of the
//! devices' EMA updates gives the codebooks of one device trained on the union of the
//! batches.
//!
//! [`EmaResidualVectorQuantizerConfig::data_parallel`]:
//! rvq_burn::EmaResidualVectorQuantizerConfig::data_parallel

use std::fs;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::config::Config;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{Adaptor, LossInput, LossMetric, MetricDefinition, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining,
};
use burn::train::{
    ExecutionStrategy, InferenceStep, ItemLazy, Learner, LearnerSummary, MultiDeviceOptim,
    SupervisedTraining, TrainOutput, TrainStep,
};
use rvq_burn::ForwardOptions;
use serde::{Deserialize, Serialize};

use crate::data::{Digits, Mnist};
use crate::error::DemoError;
use crate::evaluation::{Validation, evaluate};
use crate::model::VqVae;
use crate::report;
use crate::training::{TrainingConfig, checkpoint_dir};

/// One line of `OUT/metrics.jsonl` of a run on several devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevicesEpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Devices trained on.
    pub devices: usize,
    /// Mean training loss of the epoch (Burn's `LossMetric`).
    pub train_loss: f64,
    /// Mean validation loss after the epoch (Burn's `LossMetric`, first device).
    pub valid_loss: f64,
    /// Wall time of the epoch's training split.
    pub train_seconds: f64,
    /// Training images per second, all devices together.
    pub images_per_second: f64,
}

/// What a run on several devices returns.
#[derive(Debug)]
pub struct DevicesSummary {
    /// One record per epoch.
    pub epochs: Vec<DevicesEpochRecord>,
    /// The demo's validation of the final model (as `metrics.jsonl` holds it for one device).
    pub validation: Validation,
    /// The trained model, in evaluation mode.
    pub model: VqVae,
}

/// The images of a set, batched by index.
#[derive(Clone)]
struct DigitBatcher {
    digits: Arc<Digits>,
}

impl Batcher<usize, Tensor<4>> for DigitBatcher {
    fn batch(&self, indices: Vec<usize>, device: &Device) -> Tensor<4> {
        self.digits.batch(&indices, device)
    }
}

/// A step's loss, for Burn's metrics.
pub struct StepLoss {
    loss: Tensor<1>,
}

impl ItemLazy for StepLoss {
    fn sync(self) -> Result<Self, burn::tensor::ExecutionError> {
        Ok(Self {
            loss: self.loss.without_autodiff(),
        })
    }
}

impl Adaptor<LossInput> for StepLoss {
    fn adapt(&self) -> LossInput {
        LossInput::new(self.loss.clone())
    }
}

impl TrainStep for VqVae {
    type Input = Tensor<4>;
    type Output = StepLoss;

    fn step(&self, images: Tensor<4>) -> TrainOutput<StepLoss> {
        let loss = self.forward(images, &ForwardOptions::default()).loss();
        let grads = loss.backward();
        TrainOutput::new(self, grads, StepLoss { loss })
    }
}

impl InferenceStep for VqVae {
    type Input = Tensor<4>;
    type Output = StepLoss;

    fn step(&self, images: Tensor<4>) -> StepLoss {
        let loss = self.forward(images, &ForwardOptions::default()).loss();
        StepLoss { loss }
    }
}

/// Per-epoch figures, gathered from Burn's events.
#[derive(Debug, Default)]
struct EpochLog {
    started: Option<Instant>,
    train_items: usize,
    train_seconds: Vec<(f64, usize)>,
    train_loss: Vec<f64>,
    valid_loss: Vec<f64>,
}

/// A renderer that prints one line per epoch instead of Burn's per-batch lines.
struct EpochRenderer {
    log: Arc<Mutex<EpochLog>>,
    epochs: usize,
    devices: usize,
    verbose: bool,
}

impl EpochRenderer {
    fn final_value(state: &MetricState) -> Option<f64> {
        match state {
            MetricState::Numeric(_, Some(NumericEntry::Final(value))) => Some(*value),
            _ => None,
        }
    }
}

impl MetricsRendererTraining for EpochRenderer {
    fn update_train(&mut self, state: MetricState) {
        if let Some(value) = Self::final_value(&state) {
            self.log.lock().unwrap().train_loss.push(value);
        }
    }

    fn update_valid(&mut self, state: MetricState) {
        if let Some(value) = Self::final_value(&state) {
            let mut log = self.log.lock().unwrap();
            log.valid_loss.push(value);
            if self.verbose {
                let epoch = log.valid_loss.len();
                let (seconds, items) = log.train_seconds.last().copied().unwrap_or((0.0, 0));
                println!(
                    "epoch {epoch}/{}: train loss {:.5}, valid loss {value:.5} ({:.0} img/s on {} devices, {seconds:.1} s)",
                    self.epochs,
                    log.train_loss.last().copied().unwrap_or(f64::NAN),
                    items as f64 / seconds.max(1e-9),
                    self.devices,
                );
            }
        }
    }

    fn on_train_end(
        &mut self,
        _summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        Ok(())
    }
}

impl MetricsRendererEvaluation for EpochRenderer {
    fn update_test(&mut self, _name: EvaluationName, _state: MetricState) {}

    fn on_test_end(
        &mut self,
        _summary: Option<LearnerSummary>,
    ) -> Result<(), Box<dyn core::error::Error>> {
        Ok(())
    }
}

impl TrainingProgressLogger for EpochRenderer {
    fn start(&mut self, _: usize, _: usize, _: Option<usize>, _: Option<&str>) {}

    fn update_epoch(&mut self, _epoch: usize) {}

    fn start_split(&mut self, split: &str, total_items: usize) {
        if split == "train" {
            let mut log = self.log.lock().unwrap();
            log.started = Some(Instant::now());
            log.train_items = total_items;
        }
    }

    fn update_split(&mut self, _items_processed: usize) {}

    fn end_split(&mut self) {
        let mut log = self.log.lock().unwrap();
        if let Some(started) = log.started.take() {
            let items = log.train_items;
            log.train_seconds
                .push((started.elapsed().as_secs_f64(), items));
        }
    }

    fn end(&mut self) {}

    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for EpochRenderer {
    fn start_global_progress(&mut self, _: usize) {}
    fn start_test(&mut self, _: &str, _: usize) {}
    fn update_test_progress(&mut self, _: usize) {}
    fn end_test(&mut self) {}
    fn end_global_progress(&mut self) {}
    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for EpochRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _definition: MetricDefinition) {}
}

/// Trains `config` on `data` over `devices` (plain devices; autodiff is added) with Burn's
/// `ExecutionStrategy::multi`, and writes the run to `out`: `config.json` (the quantizer
/// switched to data-parallel mode), `metrics.jsonl` (one [`DevicesEpochRecord`] per epoch),
/// `validation.json`, the final checkpoint (`compress` reads it) and the pictures.
pub fn train_on_devices(
    config: &TrainingConfig,
    data: &Mnist,
    out: &std::path::Path,
    devices: &[Device],
    verbose: bool,
) -> Result<DevicesSummary, DemoError> {
    let mut config = config.clone();
    config.model.quantizer.data_parallel = true;
    config.model.quantizer.validate()?;
    if config.batch_size == 0 {
        return Err(DemoError::Config("batch_size must be >= 1, got 0".into()));
    }
    if devices.len() < 2 {
        return Err(DemoError::Config(format!(
            "training on several devices needs at least 2, got {}",
            devices.len()
        )));
    }
    let train_set = data.train.take(config.train_limit.unwrap_or(usize::MAX));
    let valid_set = data.valid.take(config.valid_limit.unwrap_or(usize::MAX));
    if train_set.len() < devices.len() * config.batch_size || valid_set.is_empty() {
        return Err(DemoError::Config(format!(
            "{} devices x batch size {} need at least {} training digits, got {} (and a \
             non-empty validation set, got {})",
            devices.len(),
            config.batch_size,
            devices.len() * config.batch_size,
            train_set.len(),
            valid_set.len()
        )));
    }
    fs::create_dir_all(checkpoint_dir(out)).map_err(|e| DemoError::io(out, e))?;
    let config_path = out.join("config.json");
    config
        .save(&config_path)
        .map_err(|e| DemoError::io(&config_path, e))?;
    let _ = fs::remove_file(checkpoint_dir(out).join("last_epoch"));

    let devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
    let main = devices[0].clone();
    let model = config.model.try_init_seeded(&main, config.seed)?;

    let loader = |digits: Digits, shuffle: bool| {
        let indices: Vec<usize> = (0..digits.len()).collect();
        let builder = DataLoaderBuilder::new(DigitBatcher {
            digits: Arc::new(digits),
        })
        .batch_size(config.batch_size);
        let builder = match shuffle {
            true => builder.shuffle(config.seed),
            false => builder,
        };
        builder.build(InMemDataset::new(indices))
    };
    let log = Arc::new(Mutex::new(EpochLog::default()));
    let renderer = EpochRenderer {
        log: log.clone(),
        epochs: config.epochs,
        devices: devices.len(),
        verbose,
    };
    let started = Instant::now();
    let result = SupervisedTraining::new(
        out.join("learner"),
        loader(train_set, true),
        loader(valid_set.clone(), false),
    )
    .metric_train_numeric(LossMetric::new())
    .metric_valid_numeric(LossMetric::new())
    .with_training_strategy(
        ExecutionStrategy::multi(devices.clone(), MultiDeviceOptim::OptimMainDevice).into(),
    )
    .renderer(Box::new(renderer))
    .with_application_logger(None)
    .num_epochs(config.epochs)
    .launch(Learner::new(
        model,
        config.optimizer.init(),
        config.learning_rate,
    ));
    if let Some(error) = result.error {
        return Err(DemoError::Config(format!(
            "training on {} devices failed: {error}",
            devices.len()
        )));
    }
    let model = result.model;
    if verbose {
        println!(
            "trained on {} devices in {:.1} s",
            devices.len(),
            started.elapsed().as_secs_f64()
        );
    }

    let log = log.lock().unwrap();
    let epochs: Vec<DevicesEpochRecord> = (0..config.epochs)
        .map(|i| {
            let (seconds, items) = log.train_seconds.get(i).copied().unwrap_or((0.0, 0));
            DevicesEpochRecord {
                epoch: i + 1,
                devices: devices.len(),
                train_loss: log.train_loss.get(i).copied().unwrap_or(f64::NAN),
                valid_loss: log.valid_loss.get(i).copied().unwrap_or(f64::NAN),
                train_seconds: seconds,
                images_per_second: items as f64 / seconds.max(1e-9),
            }
        })
        .collect();
    let metrics_path = out.join("metrics.jsonl");
    let mut file = fs::File::create(&metrics_path).map_err(|e| DemoError::io(&metrics_path, e))?;
    for record in &epochs {
        let line = serde_json::to_string(record).expect("records serialize");
        writeln!(file, "{line}").map_err(|e| DemoError::io(&metrics_path, e))?;
    }

    let plain = main.clone().without_autodiff();
    let validation = evaluate(&model, &valid_set, config.batch_size, &plain);
    let validation_path = out.join("validation.json");
    fs::write(
        &validation_path,
        serde_json::to_string_pretty(&validation).expect("validation serializes"),
    )
    .map_err(|e| DemoError::io(&validation_path, e))?;
    let epoch = config.epochs;
    let dir = checkpoint_dir(out);
    model
        .clone()
        .save_file(dir.join(format!("model-{epoch}.bpk")))
        .map_err(|e| DemoError::Checkpoint(format!("saving model-{epoch}.bpk: {e}")))?;
    let marker = dir.join("last_epoch");
    fs::write(&marker, epoch.to_string()).map_err(|e| DemoError::io(&marker, e))?;
    report::write_reconstructions(&out.join("reconstructions.png"), &model, &valid_set, &plain)?;
    report::write_codebook_usage(&out.join("codebook_usage.png"), &validation.code_histograms)?;
    if verbose {
        println!(
            "validation: MSE {:.5}, PSNR {:.2} dB, PSNR by levels {:?}",
            validation.val_mse, validation.val_psnr_db, validation.val_psnr_db_by_levels
        );
    }
    Ok(DevicesSummary {
        epochs,
        validation,
        model,
    })
}
