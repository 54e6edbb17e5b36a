//! The export: the quantizer's state as a safetensors file in a codec's layout and naming.

use std::path::Path;

use burn::tensor::Tensor;

use super::layout::{Field, Layout};
use super::{PytorchState, checkpoint_error, projection};
use crate::error::RvqError;
use crate::quantizer::EmaResidualVectorQuantizer;

impl EmaResidualVectorQuantizer {
    /// Writes the quantizer's state in `state`'s layout and key style, under its prefix, as a
    /// safetensors file the PyTorch module loads with `load_state_dict` (merge it into a
    /// whole model's state dict for a full checkpoint). Written to a temporary file and
    /// renamed, so an existing file is replaced whole or not at all.
    pub fn try_export_pytorch(
        &self,
        path: impl AsRef<Path>,
        state: &PytorchState,
    ) -> Result<(), RvqError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let bytes = self.try_export_safetensors_bytes(state)?;
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let write =
            std::fs::write(&temporary, &bytes).and_then(|()| std::fs::rename(&temporary, path));
        write.map_err(|error| {
            let _ = std::fs::remove_file(&temporary);
            checkpoint_error(&file, None, format!("cannot write: {error}"))
        })
    }

    /// [`EmaResidualVectorQuantizer::try_export_pytorch`] into the bytes of a safetensors file.
    pub fn try_export_safetensors_bytes(&self, state: &PytorchState) -> Result<Vec<u8>, RvqError> {
        let layout = state.layout;
        self.check_layout(layout, "<export>")?;
        if !layout.styles().contains(&state.key_style) {
            return Err(RvqError::InvalidArgument {
                argument: "key_style",
                value: format!("{:?}", state.key_style),
                rule: "is not a naming of this layout (vector-quantize-pytorch has only its own)",
            });
        }
        let device = self.state_device();
        let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let key = |level: usize, field: Field| {
            layout.file_key(&state.prefix, state.key_style, level, field)
        };
        let d = self.codebook_dim();
        if let Some(projection) = self.projection() {
            projection::check_layout(layout)?;
            let (inward, outward) = projection.values();
            let (model, codebook) = (self.embedding_dim(), d);
            let shapes = [
                vec![codebook, model],
                vec![codebook],
                vec![model, codebook],
                vec![model],
            ];
            let values = [inward.weight, inward.bias, outward.weight, outward.bias];
            for ((name, shape), values) in projection::NAMES.iter().zip(shapes).zip(values) {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                let key = format!("{}{name}", state.prefix);
                tensors.push((key, safetensors::Dtype::F32, shape, bytes));
            }
        }
        for (index, level) in self.levels().iter().enumerate() {
            let statistics = level.statistics(&device);
            let k = level.num_embeddings();
            let initialized = match layout {
                Layout::VectorQuantizePytorch => (safetensors::Dtype::BOOL, vec![], vec![1u8]),
                _ => (
                    safetensors::Dtype::F32,
                    vec![1],
                    1f32.to_le_bytes().to_vec(),
                ),
            };
            tensors.push((
                key(index, Field::Initialized),
                initialized.0,
                initialized.1,
                initialized.2,
            ));
            if layout.key(state.key_style, Field::Embed).is_some() {
                // The codebook from the statistics just read.
                let codebook = statistics.codebook(self.config());
                tensors.push((
                    key(index, Field::Embed),
                    safetensors::Dtype::F32,
                    layout.file_shape(&[k, d]),
                    f32_bytes(codebook),
                ));
            }
            tensors.push((
                key(index, Field::Count),
                safetensors::Dtype::F32,
                layout.file_shape(&[k]),
                f32_bytes(statistics.counts),
            ));
            tensors.push((
                key(index, Field::Sum),
                safetensors::Dtype::F32,
                layout.file_shape(&[k, d]),
                f32_bytes(statistics.sums),
            ));
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| checkpoint_error("<export>", None, error.to_string()))?;
        safetensors::serialize(views, None)
            .map_err(|error| checkpoint_error("<export>", None, error.to_string()))
    }
}

fn f32_bytes<const D: usize>(tensor: Tensor<D>) -> Vec<u8> {
    tensor
        .into_data()
        .iter::<f32>()
        .flat_map(f32::to_le_bytes)
        .collect()
}
