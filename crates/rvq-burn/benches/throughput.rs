//! Throughput of the quantizer: training step (forward + EMA update + backward of the
//! commitment loss through the input), `encode` and `decode`, on four shapes and every
//! backend compiled in. One JSON object per (backend, shape, operation) on standard output.
//!
//! ```sh
//! cargo bench -p rvq-burn --bench throughput                         # CPU backends, all shapes
//! cargo bench -p rvq-burn --bench throughput -- --shapes small,medium --backends flex
//! cargo bench -p rvq-burn --features wgpu --bench throughput -- --backends wgpu
//! ```

use std::time::Instant;

use burn::tensor::{Device, Distribution, Int, Tensor};
use rvq_burn::{EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig};

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
}

fn parse_args() -> Args {
    let mut args = Args {
        backends: vec!["flex".into(), "ndarray".into()],
        shapes: SHAPES.iter().map(|s| s.0.to_string()).collect(),
        repeats: 5,
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
            "--bench" => {}
            other => panic!("unknown flag {other:?}: use --backends, --shapes, --repeats"),
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

fn main() {
    let args = parse_args();
    for backend in &args.backends {
        let plain = device(backend);
        let autodiff = plain.clone().autodiff();
        for &(shape, n, d, k, m) in SHAPES
            .iter()
            .filter(|s| args.shapes.iter().any(|a| a == s.0))
        {
            plain.seed(0);
            let rvq: EmaResidualVectorQuantizer =
                EmaResidualVectorQuantizerConfig::new(m, k.into(), d).init(&plain);
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

            let train = median_seconds(repeats, &plain, || {
                let input = x.clone().autodiff().require_grad();
                let out = rvq.forward(input.clone());
                let grads = out.loss.backward();
                let _ = input.grad(&grads).expect("gradient");
                rvq.sync_state();
            });
            report(backend, shape, n, d, k, m, "train_step", train);
            let _ = &autodiff;

            let eval = rvq.clone();
            let encode = median_seconds(repeats, &plain, || {
                let codes = eval.encode(x.clone());
                let _ = codes.last().map(|c| c.clone().into_data());
            });
            report(backend, shape, n, d, k, m, "encode", encode);

            let codes: Vec<Tensor<1, Int>> = eval.encode(x.clone());
            let decode = median_seconds(repeats, &plain, || {
                let _ = eval.decode(&codes, [n, d]).into_data();
            });
            report(backend, shape, n, d, k, m, "decode", decode);

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
        }
    }
}
