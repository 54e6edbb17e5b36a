//! The PyTorch codecs' layouts: which keys hold a level's state, in which naming, and how
//! the remapper files them.

use std::fmt;
use std::str::FromStr;

use crate::config::CodebookRule;
use crate::error::RvqError;

/// The name under which the store's remapper files a layer's tensors.
pub(super) const CANONICAL: &str = "rvq-import";

/// Whose state dict it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// EnCodec (`encodec/quantization/core_vq.py`; transformers `EncodecResidualVectorQuantizer`).
    Encodec,
    /// Mimi (moshi `moshi/quantization/core_vq.py`; transformers `MimiResidualVectorQuantizer`).
    Mimi,
    /// vector-quantize-pytorch `ResidualVQ` (one head).
    VectorQuantizePytorch,
}

/// Which naming of a layout's keys: the codec's own, or the Hugging Face `transformers`
/// conversion's (EnCodec and Mimi only). Imports read either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyStyle {
    /// The codec's own module names (`layers.{l}._codebook.*`).
    #[default]
    Original,
    /// The `transformers` conversion (`layers.{l}.codebook.*`, Mimi's buffers renamed).
    Transformers,
}

/// A layer's field in a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Field {
    Initialized,
    Count,
    Sum,
    Embed,
}

impl Field {
    pub(super) const ALL: [Field; 4] = [Field::Initialized, Field::Count, Field::Sum, Field::Embed];

    pub(super) fn canonical(self) -> &'static str {
        match self {
            Field::Initialized => "initialized",
            Field::Count => "count",
            Field::Sum => "sum",
            Field::Embed => "embed",
        }
    }
}

impl Layout {
    /// Every layout.
    pub const ALL: [Layout; 3] = [Layout::Encodec, Layout::Mimi, Layout::VectorQuantizePytorch];

    /// The short name (`encodec`, `mimi`, `vqp`), as in the interop cases.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Encodec => "encodec",
            Layout::Mimi => "mimi",
            Layout::VectorQuantizePytorch => "vqp",
        }
    }

    /// How the codec derives its codebook: the quantizer must be configured with it.
    pub fn codebook_rule(self) -> CodebookRule {
        match self {
            Layout::Mimi => CodebookRule::Clamp,
            Layout::Encodec | Layout::VectorQuantizePytorch => CodebookRule::Laplace,
        }
    }

    /// The key styles the layout has.
    pub(super) fn styles(self) -> &'static [KeyStyle] {
        match self {
            Layout::VectorQuantizePytorch => &[KeyStyle::Original],
            _ => &[KeyStyle::Original, KeyStyle::Transformers],
        }
    }

    /// Whether its tensors carry a leading heads axis (`[1, K]`, `[1, K, D]`).
    pub(super) fn heads_axis(self) -> bool {
        self == Layout::VectorQuantizePytorch
    }

    /// The file's shape of a layer's `[K]` or `[K, D]` tensor.
    pub(super) fn file_shape(self, shape: &[usize]) -> Vec<usize> {
        let heads: &[usize] = if self.heads_axis() { &[1] } else { &[] };
        [heads, shape].concat()
    }

    /// The submodule holding the buffers.
    pub(super) fn module(self, style: KeyStyle) -> &'static str {
        match style {
            KeyStyle::Original => "_codebook",
            KeyStyle::Transformers => "codebook",
        }
    }

    /// The buffer name of `field`, if the layout stores it.
    pub(super) fn key(self, style: KeyStyle, field: Field) -> Option<&'static str> {
        use Field::*;
        match (self, style, field) {
            (Layout::Encodec, _, Initialized) => Some("inited"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Count) => Some("cluster_size"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Sum) => Some("embed_avg"),
            (Layout::Encodec | Layout::VectorQuantizePytorch, _, Embed) => Some("embed"),
            (Layout::VectorQuantizePytorch, _, Initialized) => Some("initted"),
            (Layout::Mimi, KeyStyle::Original, Initialized) => Some("_initialized"),
            (Layout::Mimi, KeyStyle::Transformers, Initialized) => Some("initialized"),
            (Layout::Mimi, _, Count) => Some("cluster_usage"),
            (Layout::Mimi, KeyStyle::Original, Sum) => Some("embedding_sum"),
            (Layout::Mimi, KeyStyle::Transformers, Sum) => Some("embed_sum"),
            (Layout::Mimi, _, Embed) => None,
        }
    }

    /// The file's key of `field` of level `level`.
    pub(super) fn file_key(
        self,
        prefix: &str,
        style: KeyStyle,
        level: usize,
        field: Field,
    ) -> String {
        let name = self.key(style, field).unwrap_or("?");
        format!("{prefix}layers.{level}.{}.{name}", self.module(style))
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = RvqError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Layout::ALL
            .into_iter()
            .find(|layout| layout.name() == name)
            .ok_or_else(|| RvqError::InvalidArgument {
                argument: "layout",
                value: format!("{name:?}"),
                rule: "must be one of \"encodec\", \"mimi\", \"vqp\"",
            })
    }
}
