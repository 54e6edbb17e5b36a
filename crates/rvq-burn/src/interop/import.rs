//! The import: a `.pt` or safetensors file read through burn-store, every level's state
//! checked (shapes, values, the derived codebook, EnCodec's `embed`) before any is stored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use burn::store::{KeyRemapper, ModuleStore, PytorchStore, SafetensorsStore, bridge, burn_pack};
use burn::tensor::{DType, Tensor, TensorData};

use super::layout::{CANONICAL, Field, KeyStyle, Layout};
use super::projection::is_projection_key;
use super::{EMBED_TOLERANCE, ImportReport, PytorchState, checkpoint_error, pickle};
use crate::config::CodebookRule;
use crate::error::RvqError;
use crate::level::{BadStatistics, Schedule, check_statistics};
use crate::quantizer::EmaResidualVectorQuantizer;

/// One level read from a file: counts `[K]`, sums `[K, D]`, in f32.
struct LevelState {
    count: Vec<f32>,
    sum: Vec<f32>,
    embed_difference: Option<f64>,
    rebuilt: bool,
}

impl EmaResidualVectorQuantizer {
    /// Imports a PyTorch codec's quantizer state from a `.pt`/`.pth` checkpoint or a
    /// safetensors file (told apart by their contents), replacing every level's statistics.
    ///
    /// The quantizer must have the codec's number of levels, codebook sizes, dimension and
    /// [`Layout::codebook_rule`]. The import counts as the end of any initialization: the step
    /// counter moves to the first multiple of `dead_code_check_every` past the init steps, so
    /// no k-means init runs on it and the next dead-code check comes that many training steps
    /// later (as in Mimi after loading). On error the quantizer is unchanged. Import with no
    /// training forward in flight on other threads: their pending updates would be averaged
    /// into the imported state (Burn's `RunningState`).
    pub fn try_import_pytorch(
        &mut self,
        path: impl AsRef<Path>,
        state: &PytorchState,
    ) -> Result<ImportReport, RvqError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let mut head = [0u8; 9];
        let is_safetensors = {
            use std::io::Read;
            let mut reader = std::fs::File::open(path)
                .map_err(|error| checkpoint_error(&file, None, format!("cannot open: {error}")))?;
            let read = reader
                .read(&mut head)
                .map_err(|error| checkpoint_error(&file, None, format!("cannot read: {error}")))?;
            read == 9 && head[8] == b'{'
        };
        let remapper = remapper(state)?;
        let tensors = if is_safetensors {
            let mut store = SafetensorsStore::from_file(path).remap(remapper);
            read_all(&mut store, &file, "safetensors")?
        } else {
            refuse_unexpected_globals(path, state, &file)?;
            let mut store = PytorchStore::from_file(path)
                .map_indices_contiguous(false)
                .remap(remapper);
            if let Some(key) = &state.top_level_key {
                store = store.with_top_level_key(key.clone());
            }
            read_all(&mut store, &file, "PyTorch")?
        };
        self.import_tensors(tensors, state, &file)
    }

    /// [`EmaResidualVectorQuantizer::try_import_pytorch`] from the bytes of a safetensors
    /// file.
    pub fn try_import_safetensors_bytes(
        &mut self,
        bytes: Vec<u8>,
        state: &PytorchState,
    ) -> Result<ImportReport, RvqError> {
        let mut store = SafetensorsStore::from_bytes(Some(bytes)).remap(remapper(state)?);
        let tensors = read_all(&mut store, "<bytes>", "safetensors")?;
        self.import_tensors(tensors, state, "<bytes>")
    }

    fn import_tensors(
        &mut self,
        tensors: BTreeMap<String, burn_pack::Tensor>,
        state: &PytorchState,
        file: &str,
    ) -> Result<ImportReport, RvqError> {
        let layout = state.layout;
        self.check_layout(layout, file)?;
        // The remapper filed the layer's tensors as `rvq-import.{l}.{module}.{field}`.
        let mut found: BTreeMap<(usize, Field), (KeyStyle, &burn_pack::Tensor)> = BTreeMap::new();
        let projection = self.read_projection(&tensors, state, file)?;
        let mut other_keys = 0;
        for (name, tensor) in &tensors {
            if projection.is_some() && is_projection_key(&state.prefix, name) {
                continue;
            }
            match parse_canonical(name) {
                Some((level, style, field)) => {
                    if let Some((other, _)) = found.insert((level, field), (style, tensor)) {
                        let key = |style| layout.file_key(&state.prefix, style, level, field);
                        return Err(checkpoint_error(
                            file,
                            Some(&key(style)),
                            format!(
                                "and `{}` are both in the file: one naming expected (the \
                                 codec's own or transformers')",
                                key(other)
                            ),
                        ));
                    }
                }
                None => other_keys += 1,
            }
        }
        if found.is_empty() {
            return Err(no_layout_keys(&tensors, state, file));
        }
        let key_style = found
            .values()
            .next()
            .map(|(style, _)| *style)
            .unwrap_or_default();
        let levels_in_file: Vec<usize> = found
            .keys()
            .map(|(level, _)| *level)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let num_levels = self.num_levels();
        if levels_in_file.iter().any(|&level| level >= num_levels) {
            return Err(checkpoint_error(
                file,
                None,
                format!(
                    "holds levels {levels_in_file:?} of `{layout}` state under prefix {:?}, \
                     expected {num_levels} levels (num_levels of this quantizer)",
                    state.prefix
                ),
            ));
        }
        let mut keys = Vec::new();
        let mut levels = Vec::with_capacity(num_levels);
        let (rule, epsilon) = (self.config().codebook_rule, self.config().epsilon);
        let cosine = self.config().cosine_similarity;
        let d = self.codebook_dim();
        for (index, k) in self.sizes().into_iter().enumerate() {
            let mut read = |field: Field, shape: &[usize]| -> Result<Option<Vec<f32>>, RvqError> {
                let key = layout.file_key(&state.prefix, key_style, index, field);
                let Some(_) = layout.key(key_style, field) else {
                    return Ok(None);
                };
                let Some((_, tensor)) = found.get(&(index, field)) else {
                    return Err(checkpoint_error(
                        file,
                        Some(&key),
                        format!(
                            "is missing: expected level {index} of {num_levels} (the file holds \
                             levels {levels_in_file:?} of `{layout}` state)"
                        ),
                    ));
                };
                keys.push(key.clone());
                read_tensor(tensor, field, shape, layout, file, &key).map(Some)
            };
            let initialized = read(Field::Initialized, &[])?.unwrap_or_default();
            let count = read(Field::Count, &layout.file_shape(&[k]))?.unwrap_or_default();
            let sum = read(Field::Sum, &layout.file_shape(&[k, d]))?.unwrap_or_default();
            let embed = read(Field::Embed, &layout.file_shape(&[k, d]))?;
            let key = |field| layout.file_key(&state.prefix, key_style, index, field);
            if initialized.first().is_none_or(|&flag| flag == 0.0) {
                return Err(checkpoint_error(
                    file,
                    Some(&key(Field::Initialized)),
                    "is 0: the level's k-means init has not run, so the file holds no trained \
                     codebook (expected 1)",
                ));
            }
            check_values(
                &count,
                &sum,
                d,
                file,
                (&key(Field::Count), &key(Field::Sum)),
            )?;
            let mut level_state = LevelState {
                count,
                sum,
                embed_difference: None,
                rebuilt: false,
            };
            if let Some(embed) = embed {
                if let Some((at, value)) = embed.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                    return Err(checkpoint_error(
                        file,
                        Some(&key(Field::Embed)),
                        format!(
                            "holds {value} at code {}, dimension {}, expected finite values",
                            at / d,
                            at % d
                        ),
                    ));
                }
                let derived = DerivedCodebooks::of(&level_state, d, epsilon);
                check_geometry(&embed, &derived, d, cosine)
                    .map_err(|problem| checkpoint_error(file, Some(&key(Field::Embed)), problem))?;
                let matching = match cosine {
                    true => &derived.normalized,
                    false => &derived.means,
                };
                compare_embed(&mut level_state, &embed, matching, d, epsilon);
                if level_state.rebuilt {
                    let sum_key = format!("{} (rebuilt from `embed`)", key(Field::Sum));
                    let keys = (key(Field::Count), sum_key);
                    check_values(
                        &level_state.count,
                        &level_state.sum,
                        d,
                        file,
                        (&keys.0, &keys.1),
                    )?;
                }
            }
            check_codebook(&level_state, d, (rule, epsilon), file, &key(Field::Sum))?;
            levels.push(level_state);
        }
        // Everything is checked: replace the state.
        if let Some(values) = &projection {
            let current = self
                .projection()
                .expect("read only for a layer with projections");
            let replaced = current.with_values((&values.0, &values.1));
            self.set_projection(replaced);
        }
        let device = self.state_device();
        for (index, (k, read)) in self.sizes().into_iter().zip(&levels).enumerate() {
            let count = Tensor::<1>::from_data(TensorData::new(read.count.clone(), [k]), &device);
            let sum = Tensor::<2>::from_data(TensorData::new(read.sum.clone(), [k, d]), &device);
            self.try_set_statistics(index, count, sum)?;
        }
        self.set_steps_taken(Schedule::of(self.config()).steps_after_import());
        Ok(ImportReport {
            layout,
            key_style,
            keys,
            other_keys,
            embed_difference: levels.iter().map(|level| level.embed_difference).collect(),
            rebuilt_levels: (0..levels.len()).filter(|&l| levels[l].rebuilt).collect(),
        })
    }
}

/// Refuses a `.pt` file whose pickles name anything but what a state dict needs (see
/// `pickle`).
fn refuse_unexpected_globals(
    path: &Path,
    state: &PytorchState,
    file: &str,
) -> Result<(), RvqError> {
    match pickle::check_file(path, &state.trusted_globals) {
        Ok(()) => Ok(()),
        Err(pickle::Refusal::Global(name)) => Err(checkpoint_error(
            file,
            None,
            format!(
                "names `{name}` in its pickle, expected only tensors, storages, dtypes and \
                 plain containers: PyTorch would call it on loading the file; refused \
                 (nothing from the file was run; `PytorchState::with_trusted_global({name:?})` \
                 accepts it if you know the file)"
            ),
        )),
        Err(pickle::Refusal::Unreadable(reason)) => Err(checkpoint_error(
            file,
            None,
            format!("is not a readable PyTorch file: {reason}"),
        )),
    }
}

/// The store's remapper: the layout's keys under the prefix, in either naming, onto
/// `rvq-import.{l}.{style}.{field}`.
fn remapper(state: &PytorchState) -> Result<KeyRemapper, RvqError> {
    let mut remapper = KeyRemapper::new();
    let prefix = regex::escape(&state.prefix);
    for &style in state.layout.styles() {
        for field in Field::ALL {
            let Some(name) = state.layout.key(style, field) else {
                continue;
            };
            let module = state.layout.module(style);
            let style_name = match style {
                KeyStyle::Original => "original",
                KeyStyle::Transformers => "transformers",
            };
            remapper = remapper
                .add_pattern(
                    format!(r"^{prefix}layers\.(\d+)\.{module}\.{name}$"),
                    format!("{CANONICAL}.$1.{style_name}.{}", field.canonical()),
                )
                .map_err(|error| RvqError::InvalidArgument {
                    argument: "prefix",
                    value: format!("{:?} ({error})", state.prefix),
                    rule: "must make a valid key pattern",
                })?;
        }
    }
    Ok(remapper)
}

fn parse_canonical(name: &str) -> Option<(usize, KeyStyle, Field)> {
    let rest = name.strip_prefix(CANONICAL)?.strip_prefix('.')?;
    let mut parts = rest.split('.');
    let level = parts.next()?.parse().ok()?;
    let style = match parts.next()? {
        "original" => KeyStyle::Original,
        "transformers" => KeyStyle::Transformers,
        _ => return None,
    };
    let field = match parts.next()? {
        "initialized" => Field::Initialized,
        "count" => Field::Count,
        "sum" => Field::Sum,
        "embed" => Field::Embed,
        _ => return None,
    };
    parts.next().is_none().then_some((level, style, field))
}

fn read_all<S: ModuleStore>(
    store: &mut S,
    file: &str,
    kind: &str,
) -> Result<BTreeMap<String, burn_pack::Tensor>, RvqError>
where
    S::Error: fmt::Display,
{
    store.get_all_tensors().cloned().map_err(|error| {
        checkpoint_error(
            file,
            None,
            format!("is not a readable {kind} file: {error}"),
        )
    })
}

/// The error when no key of the layout is under the prefix: what is there, and which layout
/// its keys look like.
fn no_layout_keys(
    tensors: &BTreeMap<String, burn_pack::Tensor>,
    state: &PytorchState,
    file: &str,
) -> RvqError {
    let under_prefix: Vec<&String> = tensors
        .keys()
        .filter(|key| key.starts_with(&state.prefix))
        .collect();
    let sample: Vec<&String> = match under_prefix.is_empty() {
        true => tensors.keys().take(4).collect(),
        false => under_prefix.iter().take(4).copied().collect(),
    };
    let looks_like = Layout::ALL.into_iter().find(|&other| {
        other != state.layout
            && other.styles().iter().any(|&style| {
                let name = other.key(style, Field::Sum).unwrap_or("?");
                let suffix = format!(".{}.{name}", other.module(style));
                under_prefix.iter().any(|key| key.ends_with(&suffix))
            })
    });
    let hint = match looks_like {
        Some(other) => format!("; they look like the `{other}` layout"),
        None => String::new(),
    };
    let expected = state
        .layout
        .file_key(&state.prefix, KeyStyle::Original, 0, Field::Sum);
    checkpoint_error(
        file,
        None,
        format!(
            "holds no `{}` quantizer state under prefix {:?}: expected keys such as `{expected}`, \
             found {} keys under the prefix ({} in all, e.g. {sample:?}){hint}",
            state.layout,
            state.prefix,
            under_prefix.len(),
            tensors.len()
        ),
    )
}

/// A tensor's values as f32, after checking its kind and shape.
fn read_tensor(
    tensor: &burn_pack::Tensor,
    field: Field,
    shape: &[usize],
    layout: Layout,
    file: &str,
    key: &str,
) -> Result<Vec<f32>, RvqError> {
    let dtype = tensor.dtype;
    let kind_ok = match field {
        Field::Initialized => dtype.is_float() || matches!(dtype, DType::Bool(_)),
        _ => dtype.is_float() && !matches!(dtype, DType::QFloat(_)),
    };
    if !kind_ok {
        return Err(checkpoint_error(
            file,
            Some(key),
            format!(
                "has dtype {dtype:?}, expected {}",
                match field {
                    Field::Initialized => "a float or bool flag",
                    _ => "floats",
                }
            ),
        ));
    }
    let got = tensor.shape.to_vec();
    let shape_ok = match field {
        // EnCodec and Mimi store `[1]`, vector-quantize-pytorch a 0-d bool.
        Field::Initialized => got.iter().product::<usize>() == 1 && got.len() <= 1,
        _ => got == shape,
    };
    if !shape_ok {
        let expected = match field {
            Field::Initialized => "one value ([1] or [])".to_string(),
            _ => format!("{shape:?}"),
        };
        let heads = if layout.heads_axis() && got.len() == shape.len() && got[0] != 1 {
            " (vector-quantize-pytorch with heads > 1: only one head is supported)"
        } else {
            ""
        };
        return Err(checkpoint_error(
            file,
            Some(key),
            format!("has shape {got:?}, expected {expected}{heads}"),
        ));
    }
    let data = bridge::to_data(tensor)
        .map_err(|error| checkpoint_error(file, Some(key), format!("cannot be read: {error:?}")))?;
    Ok(data.iter::<f32>().collect())
}

/// The statistics as every level needs them (`level::check_statistics`), the error naming
/// the file's keys and where the value sits.
fn check_values(
    count: &[f32],
    sum: &[f32],
    d: usize,
    file: &str,
    (count_key, sum_key): (&str, &str),
) -> Result<(), RvqError> {
    let (key, problem) = match check_statistics(count, sum) {
        Ok(()) => return Ok(()),
        Err(BadStatistics::Count { at, value }) => (
            count_key,
            format!("holds {value} at code {at}, expected finite counts >= 0"),
        ),
        Err(BadStatistics::ZeroTotal) => (
            count_key,
            "sums to 0, expected a positive total (no training step has run on this level)"
                .to_string(),
        ),
        Err(BadStatistics::Sum { at, value }) => (
            sum_key,
            format!(
                "holds {value} at code {}, dimension {}, expected finite values",
                at / d,
                at % d
            ),
        ),
    };
    Err(checkpoint_error(file, Some(key), problem))
}

/// The codebook the statistics derive (by the level's rule, in f32 as the paths compute it)
/// must be finite: counts so small that the smoothing underflows, or sums so large that the
/// division overflows, are refused here rather than found as NaN in training.
fn check_codebook(
    level: &LevelState,
    d: usize,
    (rule, epsilon): (CodebookRule, f64),
    file: &str,
    sum_key: &str,
) -> Result<(), RvqError> {
    let divisors = rule.divisors(&level.count, epsilon);
    for (code, &divisor) in divisors.iter().enumerate() {
        let row = &level.sum[code * d..(code + 1) * d];
        if let Some(value) = row.iter().map(|&m| m / divisor).find(|v| !v.is_finite()) {
            return Err(checkpoint_error(
                file,
                Some(sum_key),
                format!(
                    "gives a codebook entry of {value} at code {code} (count {}, divided by \
                     {divisor} under CodebookRule::{rule:?}), expected finite values",
                    level.count[code]
                ),
            ));
        }
    }
    Ok(())
}

/// The codebook the Laplace rule derives from a level's statistics (the layouts that store
/// `embed` use it), in f64 from the f32 divisions, as smoothed means and with each row
/// L2-normalized (a cosine codebook), `[K, D]` row-major each.
struct DerivedCodebooks {
    means: Vec<f64>,
    normalized: Vec<f64>,
}

impl DerivedCodebooks {
    fn of(level: &LevelState, d: usize, epsilon: f64) -> Self {
        let smoothed = CodebookRule::Laplace.divisors(&level.count, epsilon);
        let means: Vec<f64> = level
            .sum
            .chunks_exact(d)
            .zip(&smoothed)
            .flat_map(|(row, &c)| row.iter().map(move |&m| f64::from(m / c)))
            .collect();
        let normalized = means
            .chunks_exact(d)
            .flat_map(|row| {
                let scale = 1.0 / row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-6);
                row.iter().map(move |v| v * scale)
            })
            .collect();
        Self { means, normalized }
    }
}

/// The largest per-code relative difference between `embed` and `derived`.
fn largest_difference(embed: &[f32], derived: &[f64], d: usize) -> f64 {
    let mut worst = 0.0f64;
    for (stored, derived) in embed.chunks_exact(d).zip(derived.chunks_exact(d)) {
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (&e, &derived) in stored.iter().zip(derived) {
            diff += (derived - f64::from(e)).powi(2);
            norm += f64::from(e).powi(2);
        }
        let relative = diff.sqrt() / norm.sqrt().max(1e-12);
        worst = worst.max(if relative.is_finite() {
            relative
        } else {
            f64::INFINITY
        });
    }
    worst
}

/// A stored `embed` of the other geometry than the layer's: unit rows that are the
/// normalized smoothed means (a cosine codebook, vector-quantize-pytorch's
/// `use_cosine_sim`) into a Euclidean layer, or rows not of unit length into a cosine one.
fn check_geometry(
    embed: &[f32],
    derived: &DerivedCodebooks,
    d: usize,
    cosine: bool,
) -> Result<(), String> {
    let norm = |row: &[f32]| {
        row.iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    if cosine {
        if let Some((code, row)) = embed
            .chunks_exact(d)
            .enumerate()
            .find(|(_, row)| (norm(row) - 1.0).abs() > 1e-4)
        {
            return Err(format!(
                "holds a code of length {} (code {code}): a Euclidean codebook, expected codes of \
                 unit length for this layer with cosine_similarity = true (configure it as the \
                 codec was: vector-quantize-pytorch's use_cosine_sim)",
                norm(row)
            ));
        }
        return Ok(());
    }
    let unit = embed
        .chunks_exact(d)
        .all(|row| (norm(row) - 1.0).abs() <= 1e-4);
    let euclidean = largest_difference(embed, &derived.means, d);
    let normalized = largest_difference(embed, &derived.normalized, d);
    if unit && euclidean > EMBED_TOLERANCE && normalized <= EMBED_TOLERANCE {
        return Err(format!(
            "holds a cosine codebook (codes of unit length, the normalized smoothed means of the \
             stored sums, {euclidean:.2e} from the means themselves), expected a Euclidean one \
             for this layer: configure it with `.with_cosine_similarity(true)` (the codec's \
             use_cosine_sim)"
        ));
    }
    Ok(())
}

/// Compares the stored `embed` with `derived`, the codebook the statistics give the layer
/// (see [`DerivedCodebooks`]), and rebuilds the sums from `embed` when they differ by more
/// than [`EMBED_TOLERANCE`].
fn compare_embed(level: &mut LevelState, embed: &[f32], derived: &[f64], d: usize, epsilon: f64) {
    let worst = largest_difference(embed, derived, d);
    level.embed_difference = Some(worst);
    if worst > EMBED_TOLERANCE {
        let smoothed = CodebookRule::Laplace.divisors(&level.count, epsilon);
        for (code, &c) in smoothed.iter().enumerate() {
            for j in 0..d {
                level.sum[code * d + j] = embed[code * d + j] * c;
            }
        }
        level.rebuilt = true;
    }
}
