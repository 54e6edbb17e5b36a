//! Throughput of the quantizer: training step (forward + EMA update + backward of the
//! commitment loss through the input), `encode` and `decode`, on four shapes and every
//! backend compiled in, and the entropy coding of the codes on the host (`entropy_encode`,
//! `entropy_decode`, in codes per second). One JSON object per (backend, shape, operation)
//! on standard output.
//!
//! ```sh
//! cargo bench -p rvq-burn --bench throughput                         # CPU backends, all shapes
//! cargo bench -p rvq-burn --bench throughput -- --shapes small,medium --backends flex
//! cargo bench -p rvq-burn --features wgpu --bench throughput -- --backends wgpu,wgpu-dense
//! cargo bench -p rvq-burn --bench throughput -- --backends flex,flex-tensor --shapes small
//! cargo bench -p rvq-burn --bench throughput -- --backends flex --shapes medium --parts
//! cargo bench -p rvq-burn --bench throughput -- --backends flex --shapes medium --rd
//! cargo bench -p rvq-burn --features wgpu --bench throughput -- --backends wgpu --kernels
//! ```
//!
//! `--rd`: `encode` against rate-distortion encoding (`EncodeOptions`) in the same run: the
//! lambda term at beam 1, beams 2, 4 and 8, and a depth per vector, each with its ratio to
//! greedy `encode`.
//!
//! `--kernels` (CubeCL backends): the kernels one training step, one evaluation forward, one
//! `encode` and one `decode` launch, counted by CubeCL's launch observer (every launch the
//! process issues, Burn's own and fused ones included), per kernel and per level; then each
//! kernel's time over `--repeats` training steps, each launch timed alone (CubeCL's resolved
//! timing: it waits for every kernel, so the sum is not the step's time). On a software
//! Vulkan (lavapipe) these times count work done, not a GPU's speed. With `--train-only`, the
//! training step alone; `--levels M` gives every shape M levels instead of its own. With
//! `RVQ_LAUNCH_SEQUENCE=1` set, every counted launch's kernel, in order, on standard error.
//!
//! A backend name may carry suffixes: `-dense` turns `dense_statistics` on, `-tensor` forces
//! the generic tensor path (`Execution::TensorOps`) where the backend has a faster one.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, IndexingUpdateOp, Int, Tensor};
use rvq_burn::coding::indices_to_host;
use rvq_burn::{
    EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig, EncodeOptions, Execution,
};

/// `(name, N, D, K, M)`.
const SHAPES: [(&str, usize, usize, usize, usize); 4] = [
    ("small", 4096, 64, 256, 4),
    ("medium", 16384, 128, 1024, 8),
    ("large", 65536, 128, 1024, 8),
    ("codec", 8192, 128, 2048, 12),
];

struct Args {
    backends: Vec<String>,
    shapes: Vec<String>,
    repeats: usize,
    parts: bool,
    /// `max_distance_elements` of the quantizers (memory bound of the search).
    max_distance_elements: usize,
    /// Time the training step only (for peak-memory measurements of it).
    train_only: bool,
    /// Time greedy `encode` against rate-distortion encoding.
    rd: bool,
    /// Count and time the kernels each operation launches (CubeCL backends).
    kernels: bool,
    /// Levels of every shape instead of its own (`--levels M`).
    levels: Option<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        backends: vec!["flex".into(), "ndarray".into()],
        shapes: SHAPES.iter().map(|s| s.0.to_string()).collect(),
        repeats: 5,
        parts: false,
        max_distance_elements: 1 << 24,
        train_only: false,
        rd: false,
        kernels: false,
        levels: None,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let list = |value: Option<String>| -> Vec<String> {
            value
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect()
        };
        match flag.as_str() {
            "--backends" => args.backends = list(iter.next()),
            "--shapes" => args.shapes = list(iter.next()),
            "--repeats" => args.repeats = iter.next().and_then(|v| v.parse().ok()).unwrap_or(5),
            "--parts" => args.parts = true,
            "--train-only" => args.train_only = true,
            "--rd" => args.rd = true,
            "--kernels" => args.kernels = true,
            "--levels" => {
                args.levels = Some(
                    iter.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--levels needs a number"),
                )
            }
            "--max-distance-elements" => {
                args.max_distance_elements = iter
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--max-distance-elements needs a number")
            }
            "--bench" => {}
            other => panic!(
                "unknown flag {other:?}: use --backends, --shapes, --repeats, --parts, --rd, --kernels, --levels, --max-distance-elements, --train-only"
            ),
        }
    }
    args
}

#[allow(deprecated)]
fn device(name: &str) -> Device {
    match name {
        "flex" => Device::flex(),
        "ndarray" => Device::ndarray(),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
        other => panic!("backend {other:?} not compiled in (wgpu needs --features wgpu)"),
    }
}

/// Median wall time of `repeats` runs of `run` (after one warm-up), synchronizing the device
/// after each.
fn median_seconds(repeats: usize, device: &Device, mut run: impl FnMut()) -> f64 {
    run();
    device.sync().expect("device sync");
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            run();
            device.sync().expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// One training step: forward, EMA update, backward of the loss to the input.
fn train_step(rvq: &EmaResidualVectorQuantizer, x: &Tensor<2>) {
    let input = x.clone().autodiff().require_grad();
    let out = rvq.forward(input.clone());
    let grads = out.loss.backward();
    let _ = input.grad(&grads).expect("gradient");
    rvq.sync_state();
}

/// `encode`, read back to the host.
fn encode(rvq: &EmaResidualVectorQuantizer, x: &Tensor<2>) {
    let codes = rvq.encode(x.clone());
    let _ = codes.last().map(|c| c.clone().into_data());
}

/// `decode`, read back to the host.
fn decode(rvq: &EmaResidualVectorQuantizer, codes: &[Tensor<1, Int>], shape: [usize; 2]) {
    let _ = rvq.decode(codes, shape).into_data();
}

#[allow(clippy::too_many_arguments)]
fn report(
    backend: &str,
    shape: &str,
    n: usize,
    d: usize,
    k: usize,
    m: usize,
    op: &str,
    seconds: f64,
) {
    println!(
        "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"n\":{n},\"d\":{d},\"k\":{k},\"m\":{m},\
         \"operation\":\"{op}\",\"median_seconds\":{seconds:.6},\"vectors_per_second\":{:.1}}}",
        n as f64 / seconds
    );
}

/// The primitives of one level of a training step, timed apart (`--parts`): where a backend
/// spends the step.
fn parts(
    backend: &str,
    shape: &str,
    n: usize,
    d: usize,
    k: usize,
    repeats: usize,
    device: &Device,
) {
    let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let count = Tensor::<1>::random([k], Distribution::Uniform(1.0, 2.0), device);
    let weight = Tensor::<2>::random([k, d], Distribution::Normal(0.0, 1.0), device);
    // One level with these statistics, on the tensor path, scatter-add or dense statistics.
    let level = |dense: bool| {
        let level = EmaResidualVectorQuantizerConfig::new(1, k.into(), d)
            .with_dense_statistics(dense)
            .with_execution(Execution::TensorOps)
            .init(device);
        level
            .try_set_statistics(0, count.clone(), weight.clone())
            .expect("valid statistics");
        level
    };
    let (scatter, dense) = (level(false), level(true));
    let codebook = scatter.codebook(0, device);
    let indices = Tensor::<2>::random([n, 1], Distribution::Uniform(0.0, k as f64), device)
        .int()
        .reshape([n]);
    let mut timings: Vec<(&str, f64)> = Vec::new();
    timings.push((
        "codebook from the statistics",
        median_seconds(repeats, device, || {
            let _ = scatter.codebook(0, device);
        }),
    ));
    timings.push((
        "one level, eval forward, dense counts",
        median_seconds(repeats, device, || {
            let _ = dense.forward(x.clone()).code_counts;
        }),
    ));
    timings.push((
        "one level, eval forward (search, gather, counts, loss)",
        median_seconds(repeats, device, || {
            let _ = scatter.forward(x.clone()).code_counts;
        }),
    ));
    let codebook_t = codebook.clone().transpose();
    timings.push((
        "matmul [N,D]x[D,K]",
        median_seconds(repeats, device, || {
            let _ = x.clone().matmul(codebook_t.clone());
        }),
    ));
    let distances = x.clone().matmul(codebook_t.clone());
    timings.push((
        "argmin [N,K]",
        median_seconds(repeats, device, || {
            let _ = distances.clone().argmin(1);
        }),
    ));
    timings.push((
        "gather select [K,D] -> [N,D]",
        median_seconds(repeats, device, || {
            let _ = codebook.clone().select(0, indices.clone());
        }),
    ));
    timings.push((
        "scatter-add counts [K] <- N",
        median_seconds(repeats, device, || {
            let _ = Tensor::<1>::zeros([k], device).select_assign(
                0,
                indices.clone(),
                Tensor::ones([n], device),
                IndexingUpdateOp::Add,
            );
        }),
    ));
    timings.push((
        "scatter-add integer counts [K] <- N",
        median_seconds(repeats, device, || {
            let _ = Tensor::<1, Int>::zeros([k], device)
                .select_assign(
                    0,
                    indices.clone(),
                    Tensor::<1, Int>::ones([n], device),
                    IndexingUpdateOp::Add,
                )
                .float();
        }),
    ));
    timings.push((
        "scatter-add sums [K,D] <- [N,D]",
        median_seconds(repeats, device, || {
            let _ = Tensor::<2>::zeros([k, d], device).select_assign(
                0,
                indices.clone(),
                x.clone(),
                IndexingUpdateOp::Add,
            );
        }),
    ));
    // Dense alternatives to the float scatter-add: a 0/1 matrix [K, N] built contiguous by
    // comparison, times the rows; and the same split into B blocks of rows (a batched product,
    // summed over the blocks) for more parallelism in the long reduction.
    let codes = Tensor::<1, Int>::arange(0..k as i64, device)
        .float()
        .reshape([k, 1]);
    let rows = indices.clone().float().reshape([1, n]);
    timings.push((
        "dense sums [K,N]x[N,D] (one-hot built)",
        median_seconds(repeats, device, || {
            let one_hot = codes
                .clone()
                .expand([k, n])
                .equal(rows.clone().expand([k, n]))
                .float(); // [K, N]
            let _ = one_hot.matmul(x.clone());
        }),
    ));
    for blocks in [8usize, 32] {
        if !n.is_multiple_of(blocks) {
            continue;
        }
        let label: &'static str = if blocks == 8 {
            "dense sums, 8 blocks [8,K,N/8]x[8,N/8,D]"
        } else {
            "dense sums, 32 blocks [32,K,N/32]x[32,N/32,D]"
        };
        let rows3 = indices.clone().float().reshape([blocks, 1, n / blocks]);
        let codes3 = codes.clone().reshape([1, k, 1]);
        let x3 = x.clone().reshape([blocks, n / blocks, d]);
        timings.push((
            label,
            median_seconds(repeats, device, || {
                let shape = [blocks, k, n / blocks];
                let one_hot = codes3
                    .clone()
                    .expand(shape)
                    .equal(rows3.clone().expand(shape))
                    .float(); // [B, K, N/B]
                let _ = one_hot.matmul(x3.clone()).sum_dim(0);
            }),
        ));
    }
    for (part, seconds) in timings {
        println!(
            "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"part\",\
             \"part\":\"{part}\",\"median_seconds\":{seconds:.6}}}"
        );
    }
}

fn main() {
    let args = parse_args();
    for backend in &args.backends {
        // `NAME-dense`: `dense_statistics` on; `NAME-tensor`: the generic tensor path.
        let mut name = backend.split('-');
        let plain = device(name.next().expect("a backend name"));
        let suffixes: Vec<&str> = name.collect();
        let dense = suffixes.contains(&"dense");
        let execution = match suffixes.contains(&"tensor") {
            true => Execution::TensorOps,
            false => Execution::Auto,
        };
        let autodiff = plain.clone().autodiff();
        for &(shape, n, d, k, m) in SHAPES
            .iter()
            .filter(|s| args.shapes.iter().any(|a| a == s.0))
        {
            let m = args.levels.unwrap_or(m);
            plain.seed(0);
            if args.parts {
                parts(backend, shape, n, d, k, args.repeats, &plain);
                let rvq = EmaResidualVectorQuantizerConfig::new(m, k.into(), d)
                    .with_dense_statistics(dense)
                    .with_execution(execution)
                    .init(&plain);
                let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &plain);
                for (part, seconds) in [
                    (
                        "forward, training, no backward",
                        median_seconds(args.repeats, &plain, || {
                            let _ = rvq.forward(x.clone().autodiff()).loss.into_data();
                        }),
                    ),
                    (
                        "forward + sync_state",
                        median_seconds(args.repeats, &plain, || {
                            let _ = rvq.forward(x.clone().autodiff()).loss.into_data();
                            rvq.sync_state();
                        }),
                    ),
                    (
                        "forward, eval",
                        median_seconds(args.repeats, &plain, || {
                            let _ = rvq.valid().forward(x.clone()).loss.into_data();
                        }),
                    ),
                ] {
                    println!(
                        "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"part\",\
                         \"part\":\"{part}\",\"median_seconds\":{seconds:.6}}}"
                    );
                }
                continue;
            }
            let rvq: EmaResidualVectorQuantizer =
                EmaResidualVectorQuantizerConfig::new(m, k.into(), d)
                    .with_dense_statistics(dense)
                    .with_execution(execution)
                    .with_max_distance_elements(args.max_distance_elements)
                    .init(&plain);
            let x = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), &plain);
            // A few training steps first, so that the codebooks are spread like in training.
            for _ in 0..2 {
                let _ = rvq.forward(x.clone().autodiff());
            }
            let repeats = if n >= 65536 {
                args.repeats.min(3)
            } else {
                args.repeats
            };

            if args.kernels {
                kernels(
                    backend,
                    shape,
                    (n, d, k, m),
                    repeats,
                    args.train_only,
                    &rvq,
                    &x,
                );
                continue;
            }
            if args.rd {
                rate_distortion(backend, shape, (n, d, k, m), repeats, &rvq.valid(), &x);
                continue;
            }
            let train = median_seconds(repeats, &plain, || train_step(&rvq, &x));
            report(backend, shape, n, d, k, m, "train_step", train);
            if args.train_only {
                continue;
            }
            let _ = &autodiff;

            let eval = rvq.clone();
            let encode = median_seconds(repeats, &plain, || encode(&eval, &x));
            report(backend, shape, n, d, k, m, "encode", encode);

            let codes: Vec<Tensor<1, Int>> = eval.encode(x.clone());
            let decode = median_seconds(repeats, &plain, || decode(&eval, &codes, [n, d]));
            report(backend, shape, n, d, k, m, "decode", decode);

            // Entropy coding of the codes on the host, with the EMA counts as the prior.
            let models = eval
                .entropy_models()
                .expect("codebooks small enough to code");
            let host = indices_to_host(codes.clone()).expect("codes >= 0");
            let mut stream = Vec::new();
            let compress = median_seconds(repeats, &plain, || {
                stream = models.compress(&host, &[n, d]).expect("valid codes");
            });
            let decompress = median_seconds(repeats, &plain, || {
                let _ = models.decompress(&stream).expect("own stream");
            });
            for (op, seconds) in [("entropy_encode", compress), ("entropy_decode", decompress)] {
                println!(
                    "{{\"backend\":\"host\",\"shape\":\"{shape}\",\"n\":{n},\"k\":{k},\"m\":{m},\
                     \"operation\":\"{op}\",\"median_seconds\":{seconds:.6},\
                     \"codes_per_second\":{:.1},\"bits_per_code\":{:.3}}}",
                    (n * m) as f64 / seconds,
                    (8 * stream.len()) as f64 / (n * m) as f64
                );
            }

            // The distance products alone: M matrix products [N, D] x [D, K], the bound the
            // search cannot beat.
            let codebook = Tensor::<2>::random([d, k], Distribution::Default, &plain);
            let gemm = median_seconds(repeats, &plain, || {
                for _ in 0..m {
                    let _ = x.clone().matmul(codebook.clone()).argmin(1).into_data();
                }
            });
            report(backend, shape, n, d, k, m, "distance_products_argmin", gemm);
            let products = median_seconds(repeats, &plain, || {
                let mut sum = Tensor::<2>::zeros([1, k], &plain);
                for _ in 0..m {
                    #[allow(clippy::single_range_in_vec_init)] // row 0 of [N, K]
                    let first_row = x.clone().matmul(codebook.clone()).slice([0..1]);
                    sum = sum.add(first_row);
                }
                let _ = sum.into_data();
            });
            println!(
                "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"gemm\",\
                 \"median_seconds\":{products:.6},\"gflops\":{:.1}}}",
                2.0 * (n * d * k * m) as f64 / products / 1e9
            );
            // The layer's own search, M levels' worth: a one-level quantizer holding this
            // codebook encodes the rows M times (nearest codes and the residuals they leave),
            // at the rate of its products.
            let searcher = EmaResidualVectorQuantizerConfig::new(1, k.into(), d)
                .with_max_distance_elements(args.max_distance_elements)
                .with_execution(execution)
                .init(&plain);
            searcher
                .try_set_statistics(0, Tensor::ones([k], &plain), codebook.clone().transpose())
                .expect("a valid state");
            let searching = median_seconds(repeats, &plain, || {
                for _ in 0..m {
                    let codes = searcher.try_encode(x.clone(), 1).expect("valid input");
                    let _ = codes[0].clone().into_data();
                }
            });
            println!(
                "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"search\",\
                 \"median_seconds\":{searching:.6},\"gflops\":{:.1}}}",
                2.0 * (n * d * k * m) as f64 / searching / 1e9
            );
        }
    }
}

/// `--rd`: greedy `encode` and rate-distortion encodings of the same rows, one after the
/// other in this run, each with its ratio to greedy.
fn rate_distortion(
    backend: &str,
    shape: &str,
    (n, d, k, m): (usize, usize, usize, usize),
    repeats: usize,
    eval: &EmaResidualVectorQuantizer,
    x: &Tensor<2>,
) {
    let device = x.device();
    let time = |options: &EncodeOptions| {
        median_seconds(repeats, &device, || {
            let codes = eval
                .try_encode_with(x.clone(), options)
                .expect("valid options");
            let _ = codes.last().map(|c| c.clone().into_data());
        })
    };
    let greedy = time(&EncodeOptions::new());
    report(backend, shape, n, d, k, m, "encode", greedy);
    let lambda = 0.01;
    let variants = [
        EncodeOptions::new().with_lambda(lambda),
        EncodeOptions::new().with_lambda(lambda).with_rd_depth(true),
        EncodeOptions::new().with_lambda(lambda).with_beam(2),
        EncodeOptions::new().with_lambda(lambda).with_beam(4),
        EncodeOptions::new().with_lambda(lambda).with_beam(8),
        EncodeOptions::new()
            .with_lambda(lambda)
            .with_beam(4)
            .with_rd_depth(true),
    ];
    for options in variants {
        let seconds = time(&options);
        println!(
            "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"n\":{n},\"d\":{d},\"k\":{k},\"m\":{m},\
             \"operation\":\"encode_rd\",\"lambda\":{lambda},\"beam\":{},\"rd_depth\":{},\
             \"median_seconds\":{seconds:.6},\"greedy_seconds\":{greedy:.6},\"ratio_to_greedy\":{:.3}}}",
            options.beam,
            options.rd_depth,
            seconds / greedy
        );
    }
}

/// `--kernels`: the launches of a training step, an evaluation forward, `encode` and
/// `decode`, by kernel, then each kernel's time in a training step.
#[cfg(feature = "wgpu")]
fn kernels(
    backend: &str,
    shape: &str,
    (n, d, k, m): (usize, usize, usize, usize),
    repeats: usize,
    train_only: bool,
    rvq: &EmaResidualVectorQuantizer,
    x: &Tensor<2>,
) {
    use launches::Counter;

    let device = x.device();
    let eval = rvq.valid();
    /// An operation's name and one run of it.
    type Operation<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let mut operations: Vec<Operation> = vec![("train_step", Box::new(|| train_step(rvq, x)))];
    if !train_only {
        let codes = eval.encode(x.clone());
        let eval = &eval;
        operations.push((
            "eval_forward",
            Box::new(move || {
                let _ = eval.forward(x.clone()).loss.into_data();
            }),
        ));
        operations.push(("encode", Box::new(move || encode(eval, x))));
        operations.push(("decode", Box::new(move || decode(eval, &codes, [n, d]))));
    }
    for (operation, run) in &operations {
        // Once unobserved: kernels compile and Burn's autotuning settles first.
        run();
        device.sync().expect("device sync");
        let counted = Counter::observe(false, || {
            run();
            device.sync().expect("device sync");
        });
        let total: usize = counted.values().map(|k| k.launches).sum();
        println!(
            "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"n\":{n},\"d\":{d},\"k\":{k},\"m\":{m},\
             \"operation\":\"{operation}\",\"launches\":{total},\"launches_per_level\":{:.2}}}",
            total as f64 / m as f64
        );
        for (kernel, counted) in &counted {
            println!(
                "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"{operation}\",\
                 \"kernel\":{kernel:?},\"launches\":{}}}",
                counted.launches
            );
        }
    }
    let timed = Counter::observe(true, || {
        for _ in 0..repeats {
            train_step(rvq, x);
        }
        device.sync().expect("device sync");
    });
    for (kernel, counted) in &timed {
        println!(
            "{{\"backend\":\"{backend}\",\"shape\":\"{shape}\",\"operation\":\"train_step_kernel_time\",\
             \"kernel\":{kernel:?},\"launches_per_step\":{:.2},\"seconds_per_step\":{:.6},\
             \"timing\":{:?}}}",
            counted.launches as f64 / repeats as f64,
            counted.seconds / repeats as f64,
            counted.methods.join(","),
        );
    }
}

#[cfg(not(feature = "wgpu"))]
fn kernels(
    backend: &str,
    _shape: &str,
    _dims: (usize, usize, usize, usize),
    _repeats: usize,
    _train_only: bool,
    _rvq: &EmaResidualVectorQuantizer,
    _x: &Tensor<2>,
) {
    panic!("--kernels counts CubeCL launches: build with --features wgpu (backend {backend:?})");
}

/// Counting (and timing) kernel launches with CubeCL's launch observer.
#[cfg(feature = "wgpu")]
mod launches {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use cubecl::config::type_name_format;
    use cubecl::logging::{
        Duration, LaunchObservation, LaunchObserver, TimingMethod, TimingRequest,
    };

    /// What one kernel (by its shortened name) did under observation.
    #[derive(Debug, Default, Clone)]
    pub struct Kernel {
        pub launches: usize,
        pub seconds: f64,
        /// How its launches were timed (`Device`, or `System`: host wall time around a
        /// blocking submit).
        pub methods: Vec<String>,
    }

    #[derive(Default)]
    pub struct Counter {
        timed: bool,
        /// Print every launch's name, in order, to standard error (`RVQ_LAUNCH_SEQUENCE`).
        sequence: bool,
        kernels: Mutex<BTreeMap<String, Kernel>>,
    }

    impl Counter {
        /// The launches `run` issues, by kernel; timed one by one when `timed`.
        pub fn observe(timed: bool, run: impl FnOnce()) -> BTreeMap<String, Kernel> {
            let counter = Arc::new(Counter {
                timed,
                sequence: std::env::var_os("RVQ_LAUNCH_SEQUENCE").is_some(),
                ..Counter::default()
            });
            let observation = LaunchObservation::new(counter.clone());
            run();
            drop(observation);
            counter.kernels.lock().expect("not poisoned").clone()
        }

        fn name(kernel: &str) -> String {
            type_name_format(kernel, cubecl::config::TypeNameFormatLevel::Short)
        }
    }

    impl LaunchObserver for Counter {
        fn launched(&self, kernel: &'static str) {
            let mut kernels = self.kernels.lock().expect("not poisoned");
            if self.sequence {
                eprintln!("launch {}", Self::name(kernel));
            }
            kernels.entry(Self::name(kernel)).or_default().launches += 1;
        }

        fn timing(&self) -> TimingRequest {
            match self.timed {
                true => TimingRequest::Resolved,
                false => TimingRequest::None,
            }
        }

        fn timed(&self, kernel: &'static str, duration: Duration, method: TimingMethod) {
            let mut kernels = self.kernels.lock().expect("not poisoned");
            let entry = kernels.entry(Self::name(kernel)).or_default();
            entry.seconds += duration.as_secs_f64();
            let method = format!("{method:?}");
            if !entry.methods.contains(&method) {
                entry.methods.push(method);
            }
        }
    }
}
