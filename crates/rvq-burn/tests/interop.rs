//! PyTorch codecs' quantizer state in and out (feature `pytorch`): the interop cases made by
//! the real EnCodec, Mimi and vector-quantize-pytorch (`fixtures/interop/README.md`), and
//! `$RVQ_INTEROP_DIR` when set, replayed on flex and wgpu; every bad file refused with an
//! error that names the key; a pickle that names a callable refused.
#![cfg(feature = "pytorch")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use rvq_burn::{
    CodebookRule, DeadCodeRule, EmaResidualVectorQuantizer, EmaResidualVectorQuantizerConfig,
    Execution, KeyStyle, Layout, PytorchState, RvqError,
};
use safetensors::SafeTensors;
use serde::Deserialize;

/// `format: rvq-interop/1`.
#[derive(Debug, Deserialize)]
struct Case {
    format: String,
    layout: String,
    prefix: String,
    num_levels: usize,
    codebook_size: usize,
    dim: usize,
    decay: f64,
    epsilon: f64,
    before: String,
    after: Option<String>,
    input: Vec<Vec<f32>>,
    codes: Vec<Vec<i64>>,
    quantized: Vec<Vec<f32>>,
    #[serde(default)]
    rebuilt_levels: Vec<usize>,
    #[serde(default)]
    dead_code: Option<DeadCode>,
    /// Training forwards on `input` from `before` to `after` (1 unless given).
    #[serde(default = "one")]
    after_steps: usize,
    /// vector-quantize-pytorch's `codebook_dim` (its projections' size); absent: none.
    #[serde(default)]
    codebook_dim: Option<usize>,
    /// vector-quantize-pytorch's `use_cosine_sim`.
    #[serde(default)]
    cosine: bool,
    /// The `after` forward's output and gradients, as the codec computed them.
    #[serde(default)]
    gradients: Option<Gradients>,
}

/// The `after` training forward with gradients: `sum(output * output_grad) + loss`
/// back-propagated (commitment weight `commitment_weight`). Weights in PyTorch's `[out, in]`.
#[derive(Debug, Deserialize)]
struct Gradients {
    output_grad: Vec<Vec<f32>>,
    output: Vec<Vec<f32>>,
    loss: f32,
    commitment_weight: f64,
    /// The estimator: the rotation trick (vector-quantize-pytorch's default) or not.
    rotation_trick: bool,
    input: Vec<Vec<f32>>,
    #[serde(rename = "project_in.weight")]
    project_in_weight: Vec<Vec<f32>>,
    #[serde(rename = "project_in.bias")]
    project_in_bias: Vec<f32>,
    #[serde(rename = "project_out.weight")]
    project_out_weight: Vec<Vec<f32>>,
    #[serde(rename = "project_out.bias")]
    project_out_bias: Vec<f32>,
}

fn one() -> usize {
    1
}

/// Mimi's dead-code rule, and the codes Mimi replaced in the `after` forward.
#[derive(Debug, Deserialize)]
struct DeadCode {
    threshold_usage_ratio: f64,
    replaced_usage_ratio: f64,
    check_every: usize,
    expired: Vec<Vec<usize>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

/// Every case: the fixtures, then `$RVQ_INTEROP_DIR`.
fn case_paths() -> Vec<PathBuf> {
    let mut dirs = vec![fixtures()];
    if let Some(dir) = std::env::var_os("RVQ_INTEROP_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    let mut paths = Vec::new();
    for dir in dirs {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        found.sort();
        paths.extend(found);
    }
    paths
}

fn quantizer(
    case: &Case,
    layout: Layout,
    device: &Device,
    execution: Execution,
) -> EmaResidualVectorQuantizer {
    let mut config =
        EmaResidualVectorQuantizerConfig::new(case.num_levels, case.codebook_size.into(), case.dim)
            .with_execution(execution)
            .with_ema_decay(case.decay)
            .with_epsilon(case.epsilon)
            .with_codebook_rule(layout.codebook_rule())
            .with_codebook_dim(case.codebook_dim)
            .with_cosine_similarity(case.cosine);
    if let Some(gradients) = &case.gradients {
        config = config
            .with_beta(gradients.commitment_weight)
            .with_rotation_trick(gradients.rotation_trick);
    }
    if let Some(dead) = &case.dead_code {
        config = config
            .with_threshold_ema_dead_code(dead.threshold_usage_ratio)
            .with_dead_code_check_every(dead.check_every)
            .with_dead_code_rule(DeadCodeRule::BeforeUpdate {
                replaced_usage_ratio: dead.replaced_usage_ratio,
            });
    }
    // On the autodiff device: the projections are parameters with gradients.
    config.init(&device.clone().autodiff())
}

/// The tensors of a safetensors file: name -> (dtype, shape, values as f32).
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<f32>)>;

fn read_safetensors(bytes: &[u8]) -> Result<Tensors, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            safetensors::Dtype::BOOL => view.data().iter().map(|&b| f32::from(b)).collect(),
            other => return Err(format!("`{name}`: dtype {other:?}")),
        };
        tensors.insert(
            name,
            (format!("{:?}", view.dtype()), view.shape().to_vec(), values),
        );
    }
    Ok(tensors)
}

/// `got` has `want`'s keys, dtypes and shapes, and values within `tolerance(key)`
/// (`|got - want| <= tol * max(1, |want|)`), except the rows `skip(key)` lists.
fn compare_files(
    got: &Tensors,
    want: &Tensors,
    tolerance: impl Fn(&str) -> f64,
    skip_rows: impl Fn(&str) -> Option<(usize, Vec<usize>)>,
) -> Result<(), String> {
    let (got_keys, want_keys): (Vec<_>, Vec<_>) = (got.keys().collect(), want.keys().collect());
    if got_keys != want_keys {
        return Err(format!("keys {got_keys:?}, expected {want_keys:?}"));
    }
    for (key, (dtype, shape, values)) in want {
        let (got_dtype, got_shape, got_values) = &got[key];
        if (got_dtype, got_shape) != (dtype, shape) {
            return Err(format!(
                "`{key}`: {got_dtype} {got_shape:?}, expected {dtype} {shape:?}"
            ));
        }
        let tolerance = tolerance(key);
        let skipped = skip_rows(key);
        for (i, (&g, &w)) in got_values.iter().zip(values).enumerate() {
            if let Some((row_len, rows)) = &skipped
                && rows.contains(&(i / row_len))
            {
                continue;
            }
            if (f64::from(g) - f64::from(w)).abs() > tolerance * f64::from(w).abs().max(1.0) {
                return Err(format!(
                    "`{key}`[{i}]: got {g}, want {w} (|diff| = {:e}, tolerance {tolerance:e} \
                     relative)",
                    (g - w).abs()
                ));
            }
        }
    }
    Ok(())
}

fn rows(values: &[Vec<f32>], device: &Device) -> Tensor<2> {
    let d = values.first().map_or(0, Vec::len);
    let flat: Vec<f32> = values.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [values.len(), d]), device)
}

/// Replays one case on `device`; the error names what differs.
fn replay_case(path: &Path, device: &Device, execution: Execution) -> Result<(), String> {
    let dir = path.parent().unwrap();
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let case: Case = serde_json::from_str(&text).map_err(|e| format!("json: {e}"))?;
    if case.format != "rvq-interop/1" {
        return Err(format!(
            "format {:?}, expected \"rvq-interop/1\"",
            case.format
        ));
    }
    let layout: Layout = case.layout.parse().map_err(|e: RvqError| e.to_string())?;
    let state = PytorchState::new(layout).with_prefix(case.prefix.clone());
    let mut rvq = quantizer(&case, layout, device, execution);
    let before_path = dir.join(&case.before);
    let report = rvq
        .try_import_pytorch(&before_path, &state)
        .map_err(|e| format!("import: {e}"))?;
    if report.rebuilt_levels != case.rebuilt_levels {
        return Err(format!(
            "levels rebuilt from `embed`: {:?}, expected {:?}",
            report.rebuilt_levels, case.rebuilt_levels
        ));
    }

    // Codes exactly, decoded output to 1e-5.
    let n = case.input.len();
    let x = rows(&case.input, device);
    let codes = rvq.encode(x.clone());
    if codes.len() != case.codes.len() {
        return Err(format!(
            "{} levels of codes, expected {}",
            codes.len(),
            case.codes.len()
        ));
    }
    for (level, (got, want)) in codes.iter().zip(&case.codes).enumerate() {
        let got = ints(got.clone());
        if &got != want {
            let at = got.iter().zip(want).position(|(g, w)| g != w);
            return Err(format!("codes of level {level} differ (first at {at:?})"));
        }
    }
    let codes: Vec<Tensor<1, Int>> = case
        .codes
        .iter()
        .map(|level| Tensor::from_data(TensorData::new(level.clone(), [n]), device))
        .collect();
    let decoded = rvq.decode(&codes, [n, case.dim]);
    let want: Vec<f32> = case.quantized.iter().flatten().copied().collect();
    compare("quantized", &floats(decoded), &want)?;

    // Export gives back the `before` file: counts, sums and flags exactly, `embed` to 1e-6
    // (sums of rebuilt levels are the consistent ones, not the file's).
    let before = read_safetensors(&std::fs::read(&before_path).map_err(|e| e.to_string())?)?;
    let style = match before.keys().any(|key| key.contains(".codebook.")) {
        true => KeyStyle::Transformers,
        false => KeyStyle::Original,
    };
    let state = state.with_key_style(style);
    let export = |rvq: &EmaResidualVectorQuantizer| {
        rvq.try_export_safetensors_bytes(&state)
            .map_err(|e| format!("export: {e}"))
            .and_then(|bytes| read_safetensors(&bytes))
    };
    let level_of = |key: &str| -> Option<usize> {
        let rest = key.strip_prefix(&case.prefix)?.strip_prefix("layers.")?;
        rest.split('.').next()?.parse().ok()
    };
    let is_sum = |key: &str| {
        ["embed_avg", "embedding_sum", "embed_sum"]
            .iter()
            .any(|name| key.ends_with(&format!(".{name}")))
    };
    compare_files(
        &export(&rvq)?,
        &before,
        |key| if key.ends_with(".embed") { 1e-6 } else { 0.0 },
        |key| {
            let level = level_of(key)?;
            (is_sum(key) && case.rebuilt_levels.contains(&level))
                .then(|| (case.dim, (0..case.codebook_size).collect()))
        },
    )
    .map_err(|e| format!("export of the imported state against {}: {e}", case.before))?;

    // One training forward on `input`: the state within 1e-5 relative of `after`.
    let Some(after_name) = &case.after else {
        return Ok(());
    };
    let x = x.without_autodiff().autodiff().require_grad();
    for step in 1..case.after_steps {
        let out = rvq.forward(x.clone());
        if out.restarted_codes.iter().any(|&n| n > 0) {
            return Err(format!(
                "forward {step} of {} restarted codes {:?}; the codec checks on the last only",
                case.after_steps, out.restarted_codes
            ));
        }
    }
    let out = rvq.forward(x.clone());
    if let Some(gradients) = &case.gradients {
        check_gradients(&rvq, x, out.clone(), gradients)?;
    }
    rvq.sync_state();
    if let Some(dead) = &case.dead_code {
        let want: Vec<usize> = dead.expired.iter().map(Vec::len).collect();
        if out.restarted_codes != want {
            return Err(format!(
                "restarted codes per level {:?}, Mimi replaced {want:?}",
                out.restarted_codes
            ));
        }
    }
    let after = read_safetensors(
        &std::fs::read(dir.join(after_name)).map_err(|e| format!("{after_name}: {e}"))?,
    )?;
    compare_files(
        &export(&rvq)?,
        &after,
        |_| 1e-5,
        |key| {
            // Mimi's replacement vectors are random draws: skip those sums' rows.
            let dead = case.dead_code.as_ref()?;
            let level = level_of(key)?;
            is_sum(key).then(|| (case.dim, dead.expired[level].clone()))
        },
    )
    .map_err(|e| format!("state after one training forward against {after_name}: {e}"))
}

/// The training forward's output, loss and gradients (to the input and the projections)
/// against the codec's.
fn check_gradients(
    rvq: &EmaResidualVectorQuantizer,
    x: Tensor<2>,
    out: rvq_burn::RvqOutput<2>,
    want: &Gradients,
) -> Result<(), String> {
    let device = x.device();
    let flat = |rows: &[Vec<f32>]| rows.iter().flatten().copied().collect::<Vec<f32>>();
    compare(
        "training output",
        &floats(out.quantized.clone()),
        &flat(&want.output),
    )?;
    compare("training loss", &floats(out.loss.clone()), &[want.loss])?;
    let output_grad = rows(&want.output_grad, &device.clone().without_autodiff()).autodiff();
    let total = out.quantized.mul(output_grad).sum().add(out.loss);
    let grads = total.backward();
    let got = x.grad(&grads).ok_or("no gradient for the input")?;
    compare("input gradient", &floats(got), &flat(&want.input))?;
    let projection = rvq
        .projection()
        .ok_or("a gradient case without projections")?;
    for (name, layer, weight, bias) in [
        (
            "project_in",
            &projection.project_in,
            &want.project_in_weight,
            &want.project_in_bias,
        ),
        (
            "project_out",
            &projection.project_out,
            &want.project_out_weight,
            &want.project_out_bias,
        ),
    ] {
        let grad = layer
            .weight
            .val()
            .grad(&grads)
            .ok_or(format!("no gradient for {name}.weight"))?;
        // Burn's [in, out] against PyTorch's [out, in].
        compare(
            &format!("{name}.weight gradient"),
            &floats(grad.transpose()),
            &flat(weight),
        )?;
        let bias_param = layer.bias.as_ref().ok_or(format!("{name} without bias"))?;
        let grad = bias_param
            .val()
            .grad(&grads)
            .ok_or(format!("no gradient for {name}.bias"))?;
        compare(&format!("{name}.bias gradient"), &floats(grad), bias)?;
    }
    Ok(())
}

fn replay_all(backend: &str, device: &Device, execution: Execution) -> BTreeMap<String, usize> {
    let mut per_layout = BTreeMap::new();
    let mut failures = Vec::new();
    for path in case_paths() {
        let start = std::time::Instant::now();
        let result = replay_case(&path, device, execution);
        eprintln!(
            "{} on {backend} ({execution:?}): {:.1} s",
            path.file_name().unwrap().to_string_lossy(),
            start.elapsed().as_secs_f64()
        );
        match result {
            Ok(()) => {
                let text = std::fs::read_to_string(&path).unwrap();
                let case: Case = serde_json::from_str(&text).unwrap();
                *per_layout.entry(case.layout).or_default() += 1;
            }
            Err(error) => failures.push(format!(
                "{} on {backend} ({execution:?}): {error}",
                path.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    per_layout
}

fn assert_every_layout(per_layout: &BTreeMap<String, usize>) {
    for layout in Layout::ALL {
        let replayed = per_layout.get(layout.name()).copied().unwrap_or(0);
        assert!(
            replayed >= 2,
            "{layout}: {replayed} cases replayed, expected at least 2 ({per_layout:?})"
        );
    }
}

/// The host path, and the tensor path it must equal.
#[test]
fn interop_cases_replay_on_flex() {
    for execution in [Execution::Auto, Execution::TensorOps] {
        assert_every_layout(&replay_all("flex", &Device::flex(), execution));
    }
}

/// WGPU on Mesa's software Vulkan in CI; `RVQ_SKIP_WGPU=1` skips it, loudly.
#[cfg(feature = "wgpu")]
#[test]
fn interop_cases_replay_on_wgpu() {
    if std::env::var_os("RVQ_SKIP_WGPU").is_some() {
        eprintln!("RVQ_SKIP_WGPU set: WGPU interop replay SKIPPED");
        return;
    }
    assert_every_layout(&replay_all("wgpu", &wgpu_device(), Execution::Auto));
}

/// A scratch directory of this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rvq-interop-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A safetensors file's tensors: name -> (dtype, shape, bytes).
type RawTensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Rewrites a safetensors file with `edit` applied to its tensors.
fn rewrite(from: &Path, to: &Path, edit: impl FnOnce(&mut RawTensors)) {
    let bytes = std::fs::read(from).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: RawTensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(to, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Copies case `name` into `dir` with value `index` of `key` in its `after` file changed, and
/// replays the copy on flex: the error it must fail with.
fn replay_with_changed_after(dir: &Path, name: &str, key: &str, index: usize) -> String {
    for suffix in [".json", ".before.safetensors"] {
        std::fs::copy(
            fixtures().join(format!("{name}{suffix}")),
            dir.join(format!("{name}{suffix}")),
        )
        .unwrap();
    }
    rewrite(
        &fixtures().join(format!("{name}.after.safetensors")),
        &dir.join(format!("{name}.after.safetensors")),
        |tensors| {
            let data = &mut tensors.get_mut(key).expect("the key is in the case").2;
            let bytes = &mut data[4 * index..4 * index + 4];
            let value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            bytes.copy_from_slice(&(value * 1.001 + 0.01).to_le_bytes());
        },
    );
    replay_case(
        &dir.join(format!("{name}.json")),
        &Device::flex(),
        Execution::Auto,
    )
    .expect_err("the changed value must fail")
}

#[test]
fn a_changed_value_in_after_fails_and_names_it() {
    let dir = scratch("changed");
    let name = "mimi_m4_k64_d8";
    let key = "quantizer.rvq_rest.vq.layers.2._codebook.cluster_usage";
    let error = replay_with_changed_after(&dir, name, key, 5);
    assert!(
        error.contains(key) && error.contains("[5]"),
        "the error names the key and index: {error}"
    );
    assert!(
        error.contains(&format!("{name}.after.safetensors")),
        "{error}"
    );
    // And the unchanged case replays.
    replay_case(
        &fixtures().join(format!("{name}.json")),
        &Device::flex(),
        Execution::Auto,
    )
    .unwrap();
}

/// A whole model's `.pt` checkpoint (torch.save, zip), the quantizer's keys nested under a
/// top-level key among other weights: the same codes as the safetensors case.
#[test]
fn a_whole_model_pt_checkpoint_imports_through_the_pytorch_store() {
    let path = fixtures().join("mimi_m4_k64_d8.model.pt");
    let case: Case = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("mimi_m4_k64_d8.json")).unwrap(),
    )
    .unwrap();
    let device = Device::flex();
    let mut rvq = quantizer(&case, Layout::Mimi, &device, Execution::Auto);
    let state = PytorchState::new(Layout::Mimi)
        .with_prefix(case.prefix.clone())
        .with_top_level_key("model");
    let report = rvq.try_import_pytorch(&path, &state).unwrap();
    assert_eq!(report.keys.len(), 3 * case.num_levels, "{report}");
    assert!(report.other_keys > 0, "{report}");
    let codes = rvq.encode(rows(&case.input, &device));
    assert_eq!(codes.len(), case.codes.len());
    for (got, want) in codes.iter().zip(&case.codes) {
        assert_eq!(&ints(got.clone()), want);
    }
}

/// The cases `bad_files` runs: a description, the file, the layout, the expected words.
fn bad_file(
    rvq: &mut EmaResidualVectorQuantizer,
    path: &Path,
    state: &PytorchState,
    words: &[&str],
) {
    let before = (layer_bits(rvq), rvq.steps_taken());
    let error = rvq
        .try_import_pytorch(path, state)
        .expect_err("a bad file must be refused")
        .to_string();
    eprintln!("{error}");
    for word in words {
        assert!(error.contains(word), "`{word}` not in: {error}");
    }
    assert_eq!(
        (layer_bits(rvq), rvq.steps_taken()),
        before,
        "a failed import changed the state, the projections or the step counter"
    );
}

#[test]
fn bad_files_are_errors_that_name_the_key_and_leave_the_layer_unchanged() {
    let dir = scratch("bad");
    let encodec = fixtures().join("encodec_m4_k64_d8.before.safetensors");
    let prefix = "quantizer.vq.";
    let state = PytorchState::new(Layout::Encodec).with_prefix(prefix);
    let device = Device::flex();
    let config = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8);
    let mut rvq = config.init(&device);
    let key = |field: &str| format!("{prefix}layers.1._codebook.{field}");
    let edited = |name: &str, edit: &dyn Fn(&mut RawTensors)| {
        let path = dir.join(name);
        rewrite(&encodec, &path, |tensors| edit(tensors));
        path
    };

    // A missing level, a missing key.
    let path = edited("no-level.safetensors", &|t| {
        t.retain(|name, _| !name.contains("layers.3."))
    });
    bad_file(
        &mut rvq,
        &path,
        &state,
        &["layers.3._codebook.inited", "missing", "[0, 1, 2]"],
    );
    let path = edited("no-key.safetensors", &|t| {
        t.remove(&format!("{prefix}layers.1._codebook.embed_avg"));
    });
    bad_file(&mut rvq, &path, &state, &[&key("embed_avg"), "missing"]);

    // Another K, another D: the shape in the file and the one expected.
    let mut other_k = EmaResidualVectorQuantizerConfig::new(4, 32.into(), 8).init(&device);
    bad_file(
        &mut other_k,
        &encodec,
        &state,
        &["layers.0._codebook.cluster_size", "[64]", "expected [32]"],
    );
    let mut other_d = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 16).init(&device);
    bad_file(
        &mut other_d,
        &encodec,
        &state,
        &[
            "layers.0._codebook.embed_avg",
            "[64, 8]",
            "expected [64, 16]",
        ],
    );
    // More levels in the file than in the quantizer.
    let mut fewer = EmaResidualVectorQuantizerConfig::new(2, 64.into(), 8).init(&device);
    bad_file(
        &mut fewer,
        &encodec,
        &state,
        &["[0, 1, 2, 3]", "expected 2 levels"],
    );

    // NaN and negative counts, a NaN sum, a level not initialized.
    let set = |name: &str, field: &str, value: f32| {
        let key = key(field);
        edited(name, &move |t| {
            t.get_mut(&key).unwrap().2[12..16].copy_from_slice(&value.to_le_bytes());
        })
    };
    let path = set("nan-count.safetensors", "cluster_size", f32::NAN);
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[&key("cluster_size"), "NaN", "code 3", ">= 0"],
    );
    let path = set("negative-count.safetensors", "cluster_size", -2.5);
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[&key("cluster_size"), "-2.5", "code 3"],
    );
    let path = set("nan-sum.safetensors", "embed_avg", f32::NAN);
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[&key("embed_avg"), "NaN", "code 0, dimension 3", "finite"],
    );
    let path = edited("not-initialized.safetensors", &|t| {
        let key = format!("{prefix}layers.1._codebook.inited");
        t.get_mut(&key).unwrap().2 = 0f32.to_le_bytes().to_vec();
    });
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[&key("inited"), "is 0", "k-means"],
    );
    // Integer counts: the dtype named.
    let path = edited("int-count.safetensors", &|t| {
        let entry = t.get_mut(&key("cluster_size")).unwrap();
        entry.0 = safetensors::Dtype::I32;
    });
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[&key("cluster_size"), "I32", "floats"],
    );

    // Both namings of one tensor.
    let path = edited("two-namings.safetensors", &|t| {
        let entry = t[&key("cluster_size")].clone();
        t.insert(format!("{prefix}layers.1.codebook.cluster_size"), entry);
    });
    bad_file(
        &mut rvq,
        &path,
        &state,
        &[
            "layers.1.codebook.cluster_size",
            &key("cluster_size"),
            "both",
        ],
    );
    // Statistics whose codebook is not finite: EnCodec's sums rebuilt from an `embed` so
    // large that they overflow (the rebuild comes after the file's values are checked), and
    // Mimi's clamp dividing a huge sum by a tiny count.
    let fresh = fixtures().join("encodec_fresh_init_m3_k32_d8.before.safetensors");
    let path = dir.join("huge-embed.safetensors");
    rewrite(&fresh, &path, |t| {
        let data = &mut t.get_mut(&key("embed")).unwrap().2;
        data[..4].copy_from_slice(&3e38f32.to_le_bytes());
    });
    let mut small = EmaResidualVectorQuantizerConfig::new(3, 32.into(), 8).init(&device);
    bad_file(
        &mut small,
        &path,
        &state,
        &["rebuilt from `embed`", "inf", "code 0"],
    );
    let mimi_file = fixtures().join("mimi_m4_k64_d8.before.safetensors");
    let mimi_state = PytorchState::new(Layout::Mimi).with_prefix("quantizer.rvq_rest.vq.");
    let mimi_key = |field: &str| format!("quantizer.rvq_rest.vq.layers.2._codebook.{field}");
    let path = dir.join("huge-sum.safetensors");
    rewrite(&mimi_file, &path, |t| {
        t.get_mut(&mimi_key("cluster_usage")).unwrap().2[..4]
            .copy_from_slice(&1e-30f32.to_le_bytes());
        t.get_mut(&mimi_key("embedding_sum")).unwrap().2[..4]
            .copy_from_slice(&3e38f32.to_le_bytes());
    });
    let mut mimi_layer = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8)
        .with_codebook_rule(CodebookRule::Clamp)
        .init(&device);
    bad_file(
        &mut mimi_layer,
        &path,
        &mimi_state,
        &[&mimi_key("embedding_sum"), "inf at code 0", "Clamp"],
    );

    // Another layout's file, a wrong prefix: no keys of the layout, and what was found.
    let mut mimi = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8)
        .with_codebook_rule(CodebookRule::Clamp)
        .init(&device);
    bad_file(
        &mut mimi,
        &encodec,
        &PytorchState::new(Layout::Mimi).with_prefix(prefix),
        &[
            "no `mimi` quantizer state",
            "look like the `encodec` layout",
        ],
    );
    bad_file(
        &mut rvq,
        &encodec,
        &state.clone().with_prefix("model.quantizer."),
        &[
            "under prefix \"model.quantizer.\"",
            "0 keys under the prefix (16 in all, e.g. [\"quantizer.vq.layers.0.",
        ],
    );
    // A layer whose codebook rule is not the layout's.
    bad_file(
        &mut mimi,
        &encodec,
        &state,
        &["CodebookRule::Laplace", "CodebookRule::Clamp"],
    );
    // An unknown layout name.
    let error = "soundstream".parse::<Layout>().unwrap_err().to_string();
    assert!(
        error.contains("\"soundstream\"") && error.contains("encodec"),
        "{error}"
    );

    // Truncated and garbage files, of both kinds, and a missing file.
    let bytes = std::fs::read(&encodec).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    bad_file(
        &mut rvq,
        &truncated,
        &state,
        &["truncated.safetensors", "safetensors"],
    );
    let pt = std::fs::read(fixtures().join("mimi_m4_k64_d8.model.pt")).unwrap();
    let truncated_pt = dir.join("truncated.pt");
    std::fs::write(&truncated_pt, &pt[..pt.len() * 2 / 3]).unwrap();
    bad_file(
        &mut rvq,
        &truncated_pt,
        &state,
        &["truncated.pt", "PyTorch"],
    );
    let garbage = dir.join("garbage.pt");
    std::fs::write(&garbage, b"this is not a checkpoint at all, just some text").unwrap();
    bad_file(
        &mut rvq,
        &garbage,
        &state,
        &["garbage.pt", "not a readable PyTorch file"],
    );
    bad_file(
        &mut rvq,
        &dir.join("absent.pt"),
        &state,
        &["absent.pt", "cannot open"],
    );
    // A `.pt` file's missing top-level key.
    bad_file(
        &mut mimi,
        &fixtures().join("mimi_m4_k64_d8.model.pt"),
        &PytorchState::new(Layout::Mimi).with_top_level_key("state_dict"),
        &["state_dict", "model"],
    );
}

/// A pickle protocol-2 stream `{"x": os.system("echo pwned > FILE")}`, as `pickle.dumps` of an
/// object whose `__reduce__` returns `(os.system, (command,))` writes it.
fn malicious_pickle(command: &str) -> Vec<u8> {
    let mut p = vec![0x80, 2]; // PROTO 2
    p.push(b'}'); // EMPTY_DICT
    p.push(b'X'); // BINUNICODE "x"
    p.extend(1u32.to_le_bytes());
    p.push(b'x');
    p.extend(b"cos\nsystem\n"); // GLOBAL os.system
    p.push(b'X'); // BINUNICODE command
    p.extend((command.len() as u32).to_le_bytes());
    p.extend(command.as_bytes());
    p.push(0x85); // TUPLE1
    p.push(b'R'); // REDUCE
    p.push(b's'); // SETITEM
    p.push(b'.'); // STOP
    p
}

#[test]
fn a_pickle_naming_a_callable_is_refused_and_never_run() {
    let dir = scratch("pickle");
    let marker = dir.join("pwned");
    let command = format!("echo pwned > {}", marker.display());
    let device = Device::flex();
    let mut rvq = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8).init(&device);
    let state = PytorchState::new(Layout::Encodec);
    let mut refused = |name: &str, bytes: Vec<u8>, global: &str| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        bad_file(&mut rvq, &path, &state, &[name, global, "refused"]);
    };
    // `{"x": os.system(command)}`, a plain pickle.
    refused("malicious.pt", malicious_pickle(&command), "os.system");
    // The call's result thrown away (POP) before an empty dict: burn-store's reader would see
    // a clean state dict, PyTorch would run the command.
    let mut popped = vec![0x80, 2];
    popped.extend(b"cos\nsystem\n");
    popped.push(b'X');
    popped.extend((command.len() as u32).to_le_bytes());
    popped.extend(command.as_bytes());
    popped.extend([0x85, b'R', b'0', b'}', b'.']);
    refused("popped.pt", popped, "os.system");
    // An unexpected class, instantiated: `{"w": __main__.Evil()}`.
    let mut class = vec![0x80, 2, b'}', b'X'];
    class.extend(1u32.to_le_bytes());
    class.push(b'w');
    class.extend(b"c__main__\nEvil\n");
    class.extend([b')', 0x81, b's', b'.']); // EMPTY_TUPLE, NEWOBJ, SETITEM, STOP
    refused("class.pt", class, "__main__.Evil");
    assert!(
        !marker.exists(),
        "the pickle's command ran: {} exists",
        marker.display()
    );

    // A torch.save zip (made by make_cases.py) whose state dict is a valid EnCodec state, next
    // to an entry that calls os.system (`posix.system` on Linux) when PyTorch loads it.
    let malicious = fixtures().join("malicious.pt");
    let state = PytorchState::new(Layout::Encodec)
        .with_prefix("quantizer.vq.")
        .with_top_level_key("model");
    bad_file(
        &mut rvq,
        &malicious,
        &state,
        &["malicious.pt", "posix.system", "refused"],
    );
    // Trusting the name reads the tensors, and still runs nothing.
    let trusting = state.with_trusted_global("posix.system");
    let report = rvq.try_import_pytorch(&malicious, &trusting).unwrap();
    assert_eq!(report.keys.len(), 16, "{report}");
    assert!(!Path::new("/tmp/rvq-interop-pwned").exists());
}

/// Round trip through the PyTorch layouts in both key styles: export, import into a fresh
/// layer, the same state bit for bit and the same codes.
#[test]
fn export_then_import_is_the_identity_in_every_layout_and_style() {
    let device = Device::flex();
    let mut rng = Rng::new(7);
    let x = rng.normal_tensor([256, 8], 0.0, 1.0, &device);
    for layout in Layout::ALL {
        let config = EmaResidualVectorQuantizerConfig::new(3, 16.into(), 8)
            .with_codebook_rule(layout.codebook_rule())
            .with_kmeans_init(true);
        let trained = config.init(&device);
        for _ in 0..3 {
            let _ = trained.forward(x.clone().autodiff());
        }
        trained.sync_state();
        for style in [KeyStyle::Original, KeyStyle::Transformers] {
            let state = PytorchState::new(layout)
                .with_prefix("codec.quantizer.")
                .with_key_style(style);
            let bytes = match trained.try_export_safetensors_bytes(&state) {
                Ok(bytes) => bytes,
                Err(error) => {
                    assert_eq!(layout, Layout::VectorQuantizePytorch, "{error}");
                    assert!(error.to_string().contains("key_style"), "{error}");
                    continue;
                }
            };
            let mut fresh = config.init(&device);
            let report = fresh.try_import_safetensors_bytes(bytes, &state).unwrap();
            assert_eq!(report.key_style, style);
            assert!(report.rebuilt_levels.is_empty(), "{report}");
            assert_eq!(
                state_bits(&fresh),
                state_bits(&trained),
                "{layout} {style:?}"
            );
            let (a, b) = (trained.encode(x.clone()), fresh.encode(x.clone()));
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(ints(a.clone()), ints(b.clone()));
            }
            // The import ends any initialization: a training step of a layer configured
            // with k-means init is the EMA step of one without.
            let mut plain = config.clone().with_kmeans_init(false).init(&device);
            plain
                .try_import_safetensors_bytes(
                    trained.try_export_safetensors_bytes(&state).unwrap(),
                    &state,
                )
                .unwrap();
            for layer in [&fresh, &plain] {
                let _ = layer.forward(x.clone().autodiff());
                layer.sync_state();
            }
            assert_eq!(state_bits(&fresh), state_bits(&plain), "{layout} {style:?}");
        }
    }
}

/// A copy of a projection or cosine case with one changed value fails and names the case and
/// what differs: a sum of a cosine level, a projection's bias, a gradient of the codec's.
#[test]
fn a_changed_value_in_a_projection_or_cosine_case_fails_and_names_it() {
    let dir = scratch("changed-vqp");
    for (name, key) in [
        ("vqp_cosine_m3_k64_d8", "layers.1._codebook.embed_avg"),
        ("vqp_proj_m3_k64_d16_c4", "quantizer.project_out.bias"),
    ] {
        let error = replay_with_changed_after(&dir, name, key, 1);
        assert!(
            error.contains(key) && error.contains("[1]") && error.contains(name),
            "the error names the case, the key and the index: {error}"
        );
    }
    // A gradient of the codec's, changed in the case's json.
    let name = "vqp_proj_cosine_grad_m1_k32_d12_c6";
    for suffix in [".before.safetensors", ".after.safetensors"] {
        std::fs::copy(
            fixtures().join(format!("{name}{suffix}")),
            dir.join(format!("{name}{suffix}")),
        )
        .unwrap();
    }
    let mut case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let value = &mut case["gradients"]["project_in.bias"][2];
    *value = serde_json::json!(value.as_f64().unwrap() * 1.01 + 1e-3);
    std::fs::write(dir.join(format!("{name}.json")), case.to_string()).unwrap();
    let error = replay_case(
        &dir.join(format!("{name}.json")),
        &Device::flex(),
        Execution::Auto,
    )
    .expect_err("the changed gradient must fail");
    assert!(error.contains("project_in.bias gradient[2]"), "{error}");
}

/// The projections' values (PyTorch's layout) and every EMA statistic, bit for bit.
fn layer_bits(rvq: &EmaResidualVectorQuantizer) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let projection = rvq.projection().map_or_else(Vec::new, |projection| {
        [&projection.project_in, &projection.project_out]
            .into_iter()
            .flat_map(|layer| {
                let bias = layer.bias.as_ref().unwrap().val();
                [floats(layer.weight.val()), floats(bias)]
            })
            .map(|values| values.iter().map(|v| v.to_bits()).collect())
            .collect()
    });
    (projection, state_bits(rvq))
}

/// Bad projection and cosine state: NaN in a projection's weight, projections in a file for a
/// layer without them (and missing for one with them), a cosine codebook into a Euclidean
/// layer and the reverse, a projection layer exported in a layout without projections. Each
/// a clear error naming the key; the layer unchanged.
#[test]
fn bad_projection_and_geometry_are_refused_and_leave_the_layer_unchanged() {
    let dir = scratch("bad-vqp");
    let device = Device::flex();
    let load = |name: &str| -> Case {
        serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap(),
        )
        .unwrap()
    };
    let refuse =
        |rvq: &mut EmaResidualVectorQuantizer, path: &Path, prefix: &str, words: &[&str]| {
            let state = PytorchState::new(Layout::VectorQuantizePytorch).with_prefix(prefix);
            bad_file(rvq, path, &state, words);
        };

    // NaN in project_in.weight at [1, 2] (row-major [C = 4, D = 16]: index 18).
    let name = "vqp_proj_m3_k64_d16_c4";
    let case = load(name);
    let nan_file = dir.join("nan.safetensors");
    rewrite(
        &fixtures().join(format!("{name}.before.safetensors")),
        &nan_file,
        |tensors| {
            let data = &mut tensors.get_mut("quantizer.project_in.weight").unwrap().2;
            data[18 * 4..19 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
        },
    );
    let mut projected = quantizer(
        &case,
        Layout::VectorQuantizePytorch,
        &device,
        Execution::Auto,
    );
    refuse(
        &mut projected,
        &nan_file,
        "quantizer.",
        &["quantizer.project_in.weight", "NaN", "[1, 2]"],
    );
    // The projections of a file into a layer without them, and a layer with them from a
    // file without.
    let before = fixtures().join(format!("{name}.before.safetensors"));
    let mut plain = EmaResidualVectorQuantizerConfig::new(3, 64.into(), 4).init(&device);
    refuse(
        &mut plain,
        &before,
        "quantizer.",
        &["quantizer.project_in.weight", "with_codebook_dim(Some(4))"],
    );
    let euclidean = load("vqp_m4_k64_d8");
    let mut wants_projection = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 16)
        .with_codebook_dim(Some(8))
        .with_ema_decay(euclidean.decay)
        .init(&device);
    refuse(
        &mut wants_projection,
        &fixtures().join("vqp_m4_k64_d8.before.safetensors"),
        &euclidean.prefix,
        &["quantizer.project_in.weight", "missing", "codebook_dim = 8"],
    );

    // A cosine codebook into a Euclidean layer, and a Euclidean one into a cosine layer.
    let cosine = load("vqp_cosine_m3_k64_d8");
    let mut not_cosine = EmaResidualVectorQuantizerConfig::new(3, 64.into(), 8).init(&device);
    refuse(
        &mut not_cosine,
        &fixtures().join("vqp_cosine_m3_k64_d8.before.safetensors"),
        &cosine.prefix,
        &[
            "layers.0._codebook.embed",
            "cosine codebook",
            "with_cosine_similarity(true)",
        ],
    );
    let mut wants_cosine = EmaResidualVectorQuantizerConfig::new(4, 64.into(), 8)
        .with_cosine_similarity(true)
        .init(&device);
    refuse(
        &mut wants_cosine,
        &fixtures().join("vqp_m4_k64_d8.before.safetensors"),
        &euclidean.prefix,
        &[
            "layers.0._codebook.embed",
            "Euclidean codebook",
            "cosine_similarity = true",
        ],
    );

    // Projections have no place in EnCodec's or Mimi's layout.
    for layout in [Layout::Encodec, Layout::Mimi] {
        let rvq = EmaResidualVectorQuantizerConfig::new(2, 16.into(), 8)
            .with_codebook_dim(Some(4))
            .with_codebook_rule(layout.codebook_rule())
            .init(&device);
        let error = rvq
            .try_export_safetensors_bytes(&PytorchState::new(layout))
            .expect_err("no projections in this layout");
        assert!(
            matches!(
                error,
                RvqError::InvalidArgument {
                    argument: "layout",
                    ..
                }
            ),
            "{error}"
        );
    }
}
