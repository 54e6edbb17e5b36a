//! The geometry of a regular 2-d convolution between an image and its grid of patches, and
//! the four ways values move between the two sides: im2col and col2im (patches of the image
//! as columns of a matrix, and back), spread and collect (the grid side over the image
//! positions its kernel offsets read, and back).

/// A regular 2-d convolution's geometry: the image, its grid of patches, and the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Patches {
    /// Channels of the image side.
    pub channels: usize,
    /// `[H, W]` of the image.
    pub image: [usize; 2],
    /// `[Ho, Wo]` of the grid.
    pub grid: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding before the first row and column (the end padding only changes the sizes).
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
}

impl Patches {
    /// Rows of the patch matrix: `C·kh·kw`.
    pub(super) fn rows(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Positions of the grid: `Ho·Wo`.
    pub(crate) fn cells(&self) -> usize {
        self.grid[0] * self.grid[1]
    }

    /// Values of one image.
    pub(crate) fn image_len(&self) -> usize {
        self.channels * self.image[0] * self.image[1]
    }

    /// The image row (or column) that grid row `o`, kernel row `k` reads on `axis`, if inside.
    #[inline]
    fn source(&self, axis: usize, o: usize, k: usize) -> Option<usize> {
        (o * self.stride[axis] + k * self.dilation[axis])
            .checked_sub(self.padding[axis])
            .filter(|&i| i < self.image[axis])
    }

    /// For kernel column `k`: the grid columns `lo..hi` that read inside the image, and the
    /// image column that `lo` reads.
    fn columns(&self, k: usize) -> (usize, usize, usize) {
        let (lo, hi) = (0..self.grid[1])
            .filter(|&o| self.source(1, o, k).is_some())
            .fold((usize::MAX, 0), |(lo, hi), o| (lo.min(o), hi.max(o + 1)));
        if lo >= hi {
            return (0, 0, 0);
        }
        (lo, hi, self.source(1, lo, k).expect("inside"))
    }

    /// Whether a convolution with `co` output channels moves fewer values by spreading its
    /// output side over image positions ([`Patches::spread`], `Co·kh·kw` rows of `H·W`) than by
    /// im2col (`C·kh·kw` rows of `Ho·Wo`): when it has fewer output than input channels at
    /// stride 1, as the encoder's last layer (64 -> 16).
    pub(crate) fn spreads(&self, co: usize) -> bool {
        co * self.image[0] * self.image[1] < self.channels * self.cells()
    }

    /// Calls `visit` with every line of the lowering: for each patch-matrix row (channel,
    /// kernel row, kernel column) and grid row, the image row it reads (if inside) and the grid
    /// columns that read inside the image. The four moves below are this loop with another
    /// body.
    fn lines(&self, channels: usize, mut visit: impl FnMut(Line)) {
        let [kh, kw] = self.kernel;
        for kj in 0..kw {
            let (lo, hi, start) = self.columns(kj);
            for channel in 0..channels {
                for ki in 0..kh {
                    let row = (channel * kh + ki) * kw + kj;
                    for oh in 0..self.grid[0] {
                        let ih = self.source(0, oh, ki);
                        visit(Line {
                            row,
                            channel,
                            oh,
                            ih,
                            lo,
                            hi,
                            start,
                        });
                    }
                }
            }
        }
    }

    /// The image values line `l` touches in image row `ih` of `channel`: from its first column
    /// to the row's end, read every `stride`-th.
    fn image_row(&self, l: &Line, ih: usize) -> std::ops::Range<usize> {
        let [h, w] = self.image;
        let row = l.channel * h * w + ih * w;
        row + l.start..row + w
    }

    /// Writes the patches of `image` into columns `first..first + Ho·Wo` of `cols`, a matrix
    /// `[C·kh·kw, width]`.
    pub(super) fn im2col(&self, image: &[f32], cols: &mut [f32], width: usize, first: usize) {
        let (gw, stride) = (self.grid[1], self.stride[1]);
        self.lines(self.channels, |l| {
            let line = &mut cols[l.row * width + first + l.oh * gw..][..gw];
            let Some(ih) = l.ih else {
                line.fill(0.0);
                return;
            };
            line[..l.lo].fill(0.0);
            line[l.hi..].fill(0.0);
            let src = &image[self.image_row(&l, ih)];
            let line = &mut line[l.lo..l.hi];
            if stride == 1 {
                line.copy_from_slice(&src[..line.len()]);
            } else {
                for (to, value) in line.iter_mut().zip(src.iter().step_by(stride)) {
                    *to = *value;
                }
            }
        });
    }

    /// Adds columns `first..first + Ho·Wo` of `cols` (`[C·kh·kw, width]`) into `image`, each
    /// value where [`Patches::im2col`] would have read it.
    pub(super) fn col2im(&self, cols: &[f32], width: usize, first: usize, image: &mut [f32]) {
        let (gw, stride) = (self.grid[1], self.stride[1]);
        self.lines(self.channels, |l| {
            let Some(ih) = l.ih else {
                return;
            };
            let line = &cols[l.row * width + first + l.oh * gw..][l.lo..l.hi];
            let dst = &mut image[self.image_row(&l, ih)];
            for (to, value) in dst.iter_mut().step_by(stride).zip(line) {
                *to += value;
            }
        });
    }

    /// Writes grid values `z` (`[Cg, Ho, Wo]`) into columns `first..first + H·W` of `out`
    /// (`[Cg·kh·kw, width]`): row `(c, ki, kj)` holds `z[c]` at the image positions its
    /// kernel offset reads, zero elsewhere. For one kernel offset no two grid positions read
    /// the same image position.
    pub(super) fn spread(
        &self,
        channels: usize,
        z: &[f32],
        out: &mut [f32],
        width: usize,
        first: usize,
    ) {
        let ([h, w], [gh, gw], stride) = (self.image, self.grid, self.stride[1]);
        for row in 0..channels * self.kernel[0] * self.kernel[1] {
            out[row * width + first..][..h * w].fill(0.0);
        }
        self.lines(channels, |l| {
            let Some(ih) = l.ih else {
                return;
            };
            let from = &z[l.channel * gh * gw + l.oh * gw..][l.lo..l.hi];
            let image = self.image_row(&Line { channel: 0, ..l }, ih);
            let to = &mut out[l.row * width + first..][image];
            for (to, value) in to.iter_mut().step_by(stride).zip(from) {
                *to = *value;
            }
        });
    }

    /// The adjoint of [`Patches::spread`]: adds to grid values `y` (`[Cg, Ho, Wo]`) what
    /// row `(c, ki, kj)` of `t` (`[Cg·kh·kw, width]`, columns `first..first + H·W`) holds at the
    /// image position each grid position reads.
    pub(super) fn collect(
        &self,
        channels: usize,
        t: &[f32],
        width: usize,
        first: usize,
        y: &mut [f32],
    ) {
        let ([gh, gw], stride) = (self.grid, self.stride[1]);
        self.lines(channels, |l| {
            let Some(ih) = l.ih else {
                return;
            };
            let image = self.image_row(&Line { channel: 0, ..l }, ih);
            let from = &t[l.row * width + first..][image];
            let to = &mut y[l.channel * gh * gw + l.oh * gw..][l.lo..l.hi];
            for (to, value) in to.iter_mut().zip(from.iter().step_by(stride)) {
                *to += value;
            }
        });
    }
}

/// One line of the lowering ([`Patches::lines`]).
#[derive(Debug, Clone, Copy)]
struct Line {
    /// The patch-matrix row: `(channel, kernel row, kernel column)`.
    row: usize,
    channel: usize,
    /// The grid row.
    oh: usize,
    /// The image row it reads, if inside.
    ih: Option<usize>,
    /// Grid columns `lo..hi` read inside the image, from image column `start` on.
    lo: usize,
    hi: usize,
    start: usize,
}
