//! Command line of `cargo run --release --example train -- [FLAGS]`.

use std::path::PathBuf;

use burn::config::Config;
use rvq_burn::CodebookSizes;

use crate::backend::Backend;
use crate::codec::CompressOptions;
use crate::error::DemoError;
use crate::rd_curve::RdCurveOptions;
use crate::training::TrainingConfig;

/// Usage text.
pub const USAGE: &str = "\
Train a VQ-VAE with rvq-burn's residual quantizer on MNIST.

USAGE: cargo run --release --example train -- [FLAGS]
       cargo run --release --example train -- compress|decompress|rd-curve [FLAGS]
                                                        (see compress --help)

  --config FILE        start from this TrainingConfig (e.g. an earlier OUT/config.json)
  --epochs N           passes over the training set            (default 20)
  --batch-size N       images per step                          (default 64)
  --lr F               Adam learning rate                       (default 1e-3)
  --levels N           residual quantizer levels                (default 4)
  --codebook-size N    codes per level                          (default 64)
  --seed N             seed of weights, codebooks, data order   (default 42)
  --kmeans-init        initialize the codebooks by k-means on the first batch
  --dead-code-threshold F  restart codes whose EMA count falls below F x uniform usage
                       (e.g. 0.1; default 0 = off)
  --quantize-dropout P train each batch at a random depth with probability P (default 0)
  --rotation-trick     the input's gradient through the rotation trick (Fifty et al. 2024)
                       instead of the straight-through estimator
  --codebook-dim N     search codes in an N-dimensional space: learned projections of the
                       latent in and out (vector-quantize-pytorch's codebook_dim)
  --cosine             cosine-similarity codebooks: normalized residuals and codes
                       (vector-quantize-pytorch's use_cosine_sim)
  --mask-random-tail P pad the last 1-3 rows of latent positions of each training digit
                       with probability P (the digit's rows there set to white) and mask
                       them: they enter no codebook statistic and no loss (default 0)
  --train-limit N      train on the first N training digits only
  --valid-limit N      validate on the first N validation digits only
  --data-dir DIR       read train-/t10k- MNIST IDX files (raw or .gz) from DIR
                       instead of the 10,000 embedded digits
  --out DIR            outputs: config.json, metrics.jsonl, checkpoint/, PNGs (default runs/vqvae)
                       (reconstructions, codebook_usage, training_curves)
  --resume             continue from the last checkpoint in OUT
  --backend NAME       flex (the default CPU backend), ndarray (built with --features
                       ndarray), tch (LibTorch on the CPU, built with --features tch and
                       LibTorch 2.9.0: source scripts/libtorch-env.sh; then the default),
                       wgpu (built with --features wgpu; then the default)
  --devices N          train on N devices, data-parallel: each step gives each device
                       --batch-size images, sums their gradients on the first, and runs
                       the quantizer in data-parallel mode; N copies of the CPU device, or
                       the first N discrete GPUs with wgpu (default 1)
  --quiet              no progress bar or epoch lines
  --help               this text
";

/// Usage text of the codec commands.
pub const CODEC_USAGE: &str = "\
Use a trained run as an image codec: digits -> entropy-coded codes -> digits.

USAGE: cargo run --release --example train -- compress [FLAGS]
       cargo run --release --example train -- decompress --in FILE [FLAGS]
       cargo run --release --example train -- rd-curve [FLAGS]

  --run DIR            the training run to use (config.json, checkpoint/)  (default runs/vqvae)
compress:
  --idx FILE           digits of this IDX images file (raw or .gz)
                       instead of the 1,000 validation digits
  --images N           only the first N digits
  --levels N           code the first N quantizer levels only (lower bitrate)
  --out FILE           the stream                               (default RUN/digits.rvqz)
  --png FILE           originals above their reconstructions    (default RUN/compressed.png)
decompress:
  --in FILE            the stream to decode                     (required)
  --png FILE           the decoded digits                       (default RUN/decompressed.png)
rd-curve: the validation digits coded by greedy prefixes of 1..M levels and by
rate-distortion encoding (a sweep of lambda, beams 1 and 4, a depth per latent)
  --images N           only the first N validation digits
  --out DIR            where rd_curve.jsonl and rd_curve.png go  (default RUN)
all:
  --backend NAME       flex, ndarray (with --features ndarray), tch (with --features tch),
                       wgpu (with --features wgpu)
  --help               this text
";

/// A parsed codec command.
#[derive(Debug)]
pub enum CodecCommand {
    /// `compress`.
    Compress(CompressOptions),
    /// `rd-curve`.
    RdCurve(RdCurveOptions),
    /// `decompress`.
    Decompress {
        /// The training run.
        run: PathBuf,
        /// The stream file.
        input: PathBuf,
        /// The PNG to write.
        picture: PathBuf,
    },
}

/// Parsed command line of `compress`/`decompress`.
#[derive(Debug)]
pub struct CodecCli {
    /// What to do.
    pub command: CodecCommand,
    /// `--backend`.
    pub backend: Backend,
    /// `--help` was given.
    pub help: bool,
}

/// Parses the arguments after `compress` or `decompress` (`command`).
pub fn parse_codec(
    command: &str,
    args: impl IntoIterator<Item = String>,
) -> Result<CodecCli, DemoError> {
    let (mut run, mut idx, mut images, mut levels) =
        (PathBuf::from("runs/vqvae"), None, None, None);
    let (mut out, mut input, mut png, mut backend, mut help) =
        (None, None, None, Backend::default(), false);
    let compress = command == "compress";
    let rd = command == "rd-curve";
    let mut iter = args.into_iter();
    while let Some(flag) = iter.next() {
        let path = |raw: Option<String>| value::<String>(&flag, raw).map(PathBuf::from);
        match flag.as_str() {
            "--run" => run = path(iter.next())?,
            "--png" if !rd => png = Some(path(iter.next())?),
            "--backend" => backend = value::<String>(&flag, iter.next())?.parse()?,
            "--help" | "-h" => help = true,
            "--idx" if compress => idx = Some(path(iter.next())?),
            "--images" if compress || rd => images = Some(value::<usize>(&flag, iter.next())?),
            "--levels" if compress => levels = Some(value::<usize>(&flag, iter.next())?),
            "--out" if compress || rd => out = Some(path(iter.next())?),
            "--in" if !compress => input = Some(path(iter.next())?),
            other => {
                return Err(DemoError::Config(format!(
                    "{command}: unknown flag {other:?} (see {command} --help)"
                )));
            }
        }
    }
    let command = if rd {
        if images == Some(0) {
            return Err(DemoError::Config("rd-curve: --images must be >= 1".into()));
        }
        CodecCommand::RdCurve(RdCurveOptions {
            out: out.unwrap_or_else(|| run.clone()),
            run,
            images,
        })
    } else if compress {
        if images == Some(0) || levels == Some(0) {
            return Err(DemoError::Config(
                "compress: --images and --levels must be >= 1".into(),
            ));
        }
        CodecCommand::Compress(CompressOptions {
            output: out.unwrap_or_else(|| run.join("digits.rvqz")),
            picture: png.unwrap_or_else(|| run.join("compressed.png")),
            run,
            idx,
            images,
            levels,
        })
    } else {
        let input = match (input, help) {
            (Some(input), _) => input,
            (None, true) => PathBuf::new(),
            (None, false) => {
                return Err(DemoError::Config(
                    "decompress needs --in FILE (a stream written by compress)".into(),
                ));
            }
        };
        CodecCommand::Decompress {
            picture: png.unwrap_or_else(|| run.join("decompressed.png")),
            run,
            input,
        }
    };
    Ok(CodecCli {
        command,
        backend,
        help,
    })
}

/// Parsed command line.
#[derive(Debug)]
pub struct Cli {
    /// The run's configuration, flags applied over `--config` or the defaults.
    pub config: TrainingConfig,
    /// Output directory.
    pub out: PathBuf,
    /// `--resume`.
    pub resume: bool,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--backend`.
    pub backend: Backend,
    /// `--devices`: 1, or train on several, data-parallel.
    pub devices: usize,
    /// Not `--quiet`.
    pub verbose: bool,
    /// `--help` was given.
    pub help: bool,
}

fn value<T: std::str::FromStr>(flag: &str, raw: Option<String>) -> Result<T, DemoError> {
    let raw = raw.ok_or_else(|| DemoError::Config(format!("{flag} needs a value")))?;
    raw.parse()
        .map_err(|_| DemoError::Config(format!("{flag}: cannot read {raw:?} as a number")))
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Cli, DemoError> {
    let args: Vec<String> = args.into_iter().collect();
    // --config first, so that the other flags override it wherever they stand.
    let mut config = match args.iter().position(|a| a == "--config") {
        Some(i) => {
            let path = args
                .get(i + 1)
                .ok_or_else(|| DemoError::Config("--config needs a file".into()))?;
            TrainingConfig::load(path)
                .map_err(|e| DemoError::Config(format!("--config {path}: {e}")))?
        }
        None => TrainingConfig::new(),
    };
    let mut cli_levels = None;
    let mut cli_size = None;
    let mut out = PathBuf::from("runs/vqvae");
    let mut devices = 1;
    let (mut resume, mut data_dir, mut backend, mut verbose, mut help) =
        (false, None, Backend::default(), true, false);
    let mut iter = args.into_iter();
    while let Some(flag) = iter.next() {
        match flag.as_str() {
            "--config" => {
                iter.next();
            }
            "--epochs" => config.epochs = value(&flag, iter.next())?,
            "--batch-size" => config.batch_size = value(&flag, iter.next())?,
            "--lr" => config.learning_rate = value(&flag, iter.next())?,
            "--levels" => cli_levels = Some(value::<usize>(&flag, iter.next())?),
            "--codebook-size" => cli_size = Some(value::<usize>(&flag, iter.next())?),
            "--seed" => config.seed = value(&flag, iter.next())?,
            "--kmeans-init" => config.model.quantizer.kmeans_init = true,
            "--dead-code-threshold" => {
                config.model.quantizer.threshold_ema_dead_code = value(&flag, iter.next())?
            }
            "--quantize-dropout" => {
                config.model.quantizer.quantize_dropout = value(&flag, iter.next())?
            }
            "--rotation-trick" => config.model.quantizer.rotation_trick = true,
            "--codebook-dim" => {
                config.model.quantizer.codebook_dim = Some(value(&flag, iter.next())?)
            }
            "--cosine" => config.model.quantizer.cosine_similarity = true,
            "--mask-random-tail" => config.mask_random_tail = value(&flag, iter.next())?,
            "--train-limit" => config.train_limit = Some(value(&flag, iter.next())?),
            "--valid-limit" => config.valid_limit = Some(value(&flag, iter.next())?),
            "--data-dir" => data_dir = Some(PathBuf::from(value::<String>(&flag, iter.next())?)),
            "--out" => out = PathBuf::from(value::<String>(&flag, iter.next())?),
            "--resume" => resume = true,
            "--backend" => backend = value::<String>(&flag, iter.next())?.parse()?,
            "--devices" => devices = value(&flag, iter.next())?,
            "--quiet" => verbose = false,
            "--help" | "-h" => help = true,
            other => {
                return Err(DemoError::Config(format!(
                    "unknown flag {other:?} (see --help)"
                )));
            }
        }
    }
    let quantizer = &mut config.model.quantizer;
    if let Some(levels) = cli_levels {
        quantizer.num_levels = levels;
        if let CodebookSizes::PerLevel(sizes) = &quantizer.num_embeddings {
            // A per-level list from --config cannot follow a new level count: use its first size.
            let first = sizes.first().copied().unwrap_or(64);
            quantizer.num_embeddings = CodebookSizes::Uniform(first);
        }
    }
    if let Some(size) = cli_size {
        quantizer.num_embeddings = CodebookSizes::Uniform(size);
    }
    config.model.quantizer.validate()?;
    if devices < 1 {
        return Err(DemoError::Config("--devices must be >= 1, got 0".into()));
    }
    if !(0.0..=1.0).contains(&config.mask_random_tail) {
        return Err(DemoError::Config(format!(
            "--mask-random-tail must lie in [0, 1], got {}",
            config.mask_random_tail
        )));
    }
    if config.learning_rate.is_nan() || config.learning_rate <= 0.0 {
        return Err(DemoError::Config(format!(
            "--lr must be > 0, got {}",
            config.learning_rate
        )));
    }
    Ok(Cli {
        config,
        out,
        resume,
        data_dir,
        backend,
        devices,
        verbose,
        help,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// A backend's flag without its cargo feature names the feature; with it, it parses.
    #[test]
    fn a_backend_without_its_feature_names_the_feature() {
        for (name, compiled, backend) in [
            ("ndarray", cfg!(feature = "ndarray"), Backend::NdArray),
            ("tch", cfg!(feature = "tch"), Backend::Tch),
            ("wgpu", cfg!(feature = "wgpu"), Backend::Wgpu),
        ] {
            let parsed = parse(args(&["--backend", name]));
            match compiled {
                true => assert_eq!(parsed.unwrap().backend, backend, "{name}"),
                false => {
                    let error = parsed.unwrap_err().to_string();
                    let wanted =
                        format!("--backend {name} needs the demo built with --features {name}");
                    assert!(error.contains(&wanted), "{error}");
                }
            }
        }
        assert_eq!(
            parse(args(&["--backend", "flex"])).unwrap().backend,
            Backend::Flex
        );
        let error = parse(args(&["--backend", "cuda"])).unwrap_err().to_string();
        assert!(
            error.contains("expected flex, ndarray, tch or wgpu"),
            "{error}"
        );
    }

    #[test]
    fn defaults_are_the_documented_recipe() {
        let cli = parse(args(&[])).unwrap();
        let q = &cli.config.model.quantizer;
        assert_eq!(
            (q.num_levels, q.sizes(), q.embedding_dim),
            (4, vec![64; 4], 16)
        );
        assert_eq!((q.beta, q.ema_decay), (0.25, 0.99));
        assert_eq!(
            (cli.config.batch_size, cli.config.learning_rate),
            (64, 1e-3)
        );
        assert!(!cli.resume);
    }

    #[test]
    fn flags_override() {
        let cli = parse(args(&[
            "--epochs",
            "2",
            "--levels",
            "3",
            "--codebook-size",
            "32",
            "--lr",
            "0.01",
            "--seed",
            "7",
            "--out",
            "x",
            "--resume",
        ]))
        .unwrap();
        assert_eq!(cli.config.epochs, 2);
        assert_eq!(cli.config.model.quantizer.sizes(), vec![32; 3]);
        assert_eq!(cli.config.learning_rate, 0.01);
        assert_eq!(cli.config.seed, 7);
        assert_eq!(cli.out, PathBuf::from("x"));
        assert!(cli.resume);
        let cli = parse(args(&[
            "--kmeans-init",
            "--dead-code-threshold",
            "0.1",
            "--quantize-dropout",
            "0.5",
        ]))
        .unwrap();
        let q = &cli.config.model.quantizer;
        assert!(q.kmeans_init);
        assert_eq!((q.threshold_ema_dead_code, q.quantize_dropout), (0.1, 0.5));
        assert!(!q.rotation_trick && cli.config.mask_random_tail == 0.0);
        assert_eq!((q.codebook_dim, q.cosine_similarity), (None, false));
        let cli = parse(args(&["--rotation-trick", "--mask-random-tail", "0.3"])).unwrap();
        assert!(cli.config.model.quantizer.rotation_trick);
        assert_eq!(cli.config.mask_random_tail, 0.3);
        let cli = parse(args(&["--codebook-dim", "8", "--cosine"])).unwrap();
        let q = &cli.config.model.quantizer;
        assert_eq!((q.codebook_dim, q.cosine_similarity), (Some(8), true));
        assert_eq!(cli.devices, 1);
        assert_eq!(parse(args(&["--devices", "3"])).unwrap().devices, 3);
        let error = parse(args(&["--devices", "0"])).unwrap_err().to_string();
        assert!(error.contains("--devices must be >= 1, got 0"), "{error}");
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let error = parse(args(&["--epochs", "many"])).unwrap_err().to_string();
        assert!(error.contains("--epochs: cannot read \"many\""), "{error}");
        let error = parse(args(&["--wat"])).unwrap_err().to_string();
        assert!(error.contains("unknown flag \"--wat\""), "{error}");
        let error = parse(args(&["--mask-random-tail", "1.5"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--mask-random-tail must lie in [0, 1], got 1.5"),
            "{error}"
        );
        let error = parse(args(&["--lr", "-1"])).unwrap_err().to_string();
        assert!(error.contains("--lr must be > 0"), "{error}");
        let error = parse(args(&["--config", "/nonexistent.json"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent.json"), "{error}");
    }

    #[test]
    fn codec_commands_parse_with_defaults_under_the_run() {
        let cli = parse_codec("compress", args(&["--run", "r", "--levels", "2"])).unwrap();
        match cli.command {
            CodecCommand::Compress(options) => {
                assert_eq!(options.levels, Some(2));
                assert_eq!(options.output, PathBuf::from("r/digits.rvqz"));
                assert_eq!(options.picture, PathBuf::from("r/compressed.png"));
                assert_eq!((options.images, options.idx), (None, None));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse_codec("decompress", args(&["--in", "s.rvqz"])).unwrap();
        match cli.command {
            CodecCommand::Decompress {
                run,
                input,
                picture,
            } => {
                assert_eq!(run, PathBuf::from("runs/vqvae"));
                assert_eq!(input, PathBuf::from("s.rvqz"));
                assert_eq!(picture, PathBuf::from("runs/vqvae/decompressed.png"));
            }
            other => panic!("{other:?}"),
        }
        let error = parse_codec("decompress", args(&[]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs --in FILE"), "{error}");
        let error = parse_codec("decompress", args(&["--levels", "2"]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("decompress: unknown flag \"--levels\""),
            "{error}"
        );
        let error = parse_codec("compress", args(&["--levels", "0"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be >= 1"), "{error}");
    }
}
