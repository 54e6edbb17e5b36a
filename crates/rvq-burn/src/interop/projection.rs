//! vector-quantize-pytorch's projections (`codebook_dim`: `project_in`, `project_out` on
//! `ResidualVQ`), read from and written to its state dict beside the levels' state.

use std::collections::BTreeMap;

use burn::store::{bridge, burn_pack};

use super::layout::Layout;
use super::{PytorchState, checkpoint_error};
use crate::error::RvqError;
use crate::quantizer::{EmaResidualVectorQuantizer, LinearValues};

/// The projections' keys after the prefix: `project_in` then `project_out`, weight then bias
/// (PyTorch's layout, `weight` `[out, in]`).
pub(super) const NAMES: [&str; 4] = [
    "project_in.weight",
    "project_in.bias",
    "project_out.weight",
    "project_out.bias",
];

/// Whether `name` is a projection's key under `prefix`.
pub(super) fn is_projection_key(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| NAMES.contains(&rest))
}

/// Refuses a layout other than vector-quantize-pytorch's for a quantizer with projections.
pub(super) fn check_layout(layout: Layout) -> Result<(), RvqError> {
    match layout {
        Layout::VectorQuantizePytorch => Ok(()),
        other => Err(RvqError::InvalidArgument {
            argument: "layout",
            value: format!("{other}"),
            rule: "must be \"vqp\" for a quantizer with codebook_dim: only \
                   vector-quantize-pytorch's ResidualVQ keeps its projections in this layout",
        }),
    }
}

impl EmaResidualVectorQuantizer {
    /// The projections' values in `tensors` (a file's, keys under `state.prefix`), checked:
    /// `None` for a quantizer without projections (refusing a file that has them).
    pub(super) fn read_projection(
        &self,
        tensors: &BTreeMap<String, burn_pack::Tensor>,
        state: &PytorchState,
        file: &str,
    ) -> Result<Option<(LinearValues, LinearValues)>, RvqError> {
        let key = |name: &str| format!("{}{name}", state.prefix);
        let (d, c) = (self.embedding_dim(), self.codebook_dim());
        if self.projection().is_none() {
            let weight = key(NAMES[0]);
            return match tensors.get(&weight) {
                None => Ok(None),
                Some(tensor) => Err(checkpoint_error(
                    file,
                    Some(&weight),
                    format!(
                        "is in the file, shape {:?}: the codec projects into a codebook space of \
                         its own, this quantizer has no projection (configure it with \
                         `.with_codebook_dim(Some({}))`)",
                        tensor.shape.to_vec(),
                        tensor.shape.first().copied().unwrap_or(0)
                    ),
                )),
            };
        }
        check_layout(state.layout)?;
        let shapes: [&[usize]; 4] = [&[c, d], &[c], &[d, c], &[d]];
        let mut values = Vec::with_capacity(4);
        for (name, shape) in NAMES.iter().zip(shapes) {
            let key = key(name);
            let Some(tensor) = tensors.get(&key) else {
                return Err(checkpoint_error(
                    file,
                    Some(&key),
                    format!(
                        "is missing: expected vector-quantize-pytorch's projections for \
                         codebook_dim = {c} (embedding_dim = {d})"
                    ),
                ));
            };
            values.push(read_floats(tensor, shape, file, &key)?);
        }
        let mut values = values.into_iter();
        let mut next = || values.next().expect("four tensors");
        let project_in = LinearValues {
            weight: next(),
            bias: next(),
        };
        let project_out = LinearValues {
            weight: next(),
            bias: next(),
        };
        Ok(Some((project_in, project_out)))
    }
}

/// A tensor of `shape` as finite f32 values; the error names the key and the position.
fn read_floats(
    tensor: &burn_pack::Tensor,
    shape: &[usize],
    file: &str,
    key: &str,
) -> Result<Vec<f32>, RvqError> {
    if !tensor.dtype.is_float() {
        return Err(checkpoint_error(
            file,
            Some(key),
            format!("has dtype {:?}, expected floats", tensor.dtype),
        ));
    }
    if tensor.shape.to_vec() != shape {
        return Err(checkpoint_error(
            file,
            Some(key),
            format!("has shape {:?}, expected {shape:?}", tensor.shape.to_vec()),
        ));
    }
    let data = bridge::to_data(tensor)
        .map_err(|error| checkpoint_error(file, Some(key), format!("cannot be read: {error:?}")))?;
    let values: Vec<f32> = data.iter::<f32>().collect();
    let columns = shape.get(1).copied().unwrap_or(1);
    if let Some((at, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        let place = match shape.len() {
            2 => format!("[{}, {}]", at / columns, at % columns),
            _ => format!("[{at}]"),
        };
        return Err(checkpoint_error(
            file,
            Some(key),
            format!("holds {value} at {place}, expected finite values"),
        ));
    }
    Ok(values)
}
