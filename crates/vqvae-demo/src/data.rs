//! MNIST in the IDX format: the embedded 10,000 digits, or the standard distribution files.
//!
//! IDX (<http://yann.lecun.com/exdb/mnist/>): a big-endian header, magic `0x00000803` for
//! images (`count, rows, cols`, then one byte a pixel) and `0x00000801` for labels (`count`,
//! then one byte a label). Files may be gzip-compressed; the loader tells by the first bytes.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};

/// Side of an MNIST image; the model's encoder needs 28 x 28.
pub const IMAGE_SIDE: usize = 28;
/// Pixels of one image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// The 10,000 real digits shipped with the demo (see `data/README.md` for their provenance).
static EMBEDDED_IMAGES: &[u8] = include_bytes!("../data/images-idx3-ubyte.gz");
static EMBEDDED_LABELS: &[u8] = include_bytes!("../data/labels-idx1-ubyte.gz");
/// Of the embedded digits, the first 9,000 train and the last 1,000 validate.
pub const EMBEDDED_TRAIN: usize = 9_000;

/// A set of digits: `len` images of 28 x 28 bytes, row-major, and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// `len * 784` bytes, 0 = background, 255 = ink.
    pub pixels: Vec<u8>,
    /// `len` labels 0-9.
    pub labels: Vec<u8>,
}

/// A training and a validation set.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// What the model trains on.
    pub train: Digits,
    /// What the metrics are measured on (never trained on).
    pub valid: Digits,
}

/// Why a data file could not be read; every variant names the file.
#[derive(Debug)]
pub enum DataError {
    /// The file could not be opened or read.
    Io {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A gzip stream that does not decompress.
    Gzip {
        /// The file.
        file: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The first four bytes are not the expected IDX magic number.
    Magic {
        /// The file.
        file: String,
        /// The magic number an images or labels file has.
        expected: u32,
        /// What the file has.
        got: u32,
    },
    /// The file ends before the header or the data the header announces.
    Truncated {
        /// The file.
        file: String,
        /// Bytes the header announces (header included).
        expected: usize,
        /// Bytes the file holds.
        got: usize,
    },
    /// Images that are not 28 x 28.
    ImageSize {
        /// The file.
        file: String,
        /// Rows per image.
        rows: usize,
        /// Columns per image.
        cols: usize,
    },
    /// An images file and its labels file disagree on the count.
    CountMismatch {
        /// The images file.
        images_file: String,
        /// Its count.
        images: usize,
        /// The labels file.
        labels_file: String,
        /// Its count.
        labels: usize,
    },
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { file, source } => write!(f, "{file}: cannot read: {source}"),
            Self::Gzip { file, source } => write!(f, "{file}: not a valid gzip stream: {source}"),
            Self::Magic {
                file,
                expected,
                got,
            } => write!(
                f,
                "{file}: magic number {got:#010x}, expected {expected:#010x} (is it an IDX \
                 file of the right kind?)"
            ),
            Self::Truncated {
                file,
                expected,
                got,
            } => write!(
                f,
                "{file}: truncated: {got} bytes, the header announces {expected}"
            ),
            Self::ImageSize { file, rows, cols } => {
                write!(f, "{file}: images are {rows} x {cols}, expected 28 x 28")
            }
            Self::CountMismatch {
                images_file,
                images,
                labels_file,
                labels,
            } => write!(
                f,
                "{images_file} holds {images} images but {labels_file} holds {labels} labels"
            ),
        }
    }
}

impl std::error::Error for DataError {}

impl Digits {
    /// Number of digits.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of the digits at `indices` as floats in `[0, 1]`, row-major: the values of
    /// [`Digits::batch`], on the host.
    pub fn floats(&self, indices: &[usize]) -> Vec<f32> {
        let mut values = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
        for &index in indices {
            let image = &self.pixels[index * IMAGE_PIXELS..(index + 1) * IMAGE_PIXELS];
            values.extend(image.iter().map(|&p| p as f32 / 255.0));
        }
        values
    }

    /// The digits at `indices`, as a batch `[B, 1, 28, 28]` of floats in `[0, 1]`.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Tensor<4> {
        let values = self.floats(indices);
        Tensor::from_data(
            TensorData::new(values, [indices.len(), 1, IMAGE_SIDE, IMAGE_SIDE]),
            device,
        )
    }

    /// The first `count` digits (all if there are fewer).
    pub fn take(&self, count: usize) -> Digits {
        let count = count.min(self.len());
        Digits {
            pixels: self.pixels[..count * IMAGE_PIXELS].to_vec(),
            labels: self.labels[..count].to_vec(),
        }
    }

    /// The digits from `start` on.
    fn skip(&self, start: usize) -> Digits {
        Digits {
            pixels: self.pixels[start * IMAGE_PIXELS..].to_vec(),
            labels: self.labels[start..].to_vec(),
        }
    }
}

impl Mnist {
    /// The 10,000 digits embedded in the demo: 9,000 to train, 1,000 to validate.
    pub fn embedded() -> Mnist {
        let all = parse_pair(
            "embedded images-idx3-ubyte.gz",
            EMBEDDED_IMAGES,
            "embedded labels-idx1-ubyte.gz",
            EMBEDDED_LABELS,
        )
        .expect("the embedded digits are valid IDX files");
        Mnist {
            train: all.take(EMBEDDED_TRAIN),
            valid: all.skip(EMBEDDED_TRAIN),
        }
    }

    /// The standard MNIST files in `dir`: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or with `.gz`.
    pub fn from_dir(dir: &Path) -> Result<Mnist, DataError> {
        let split = |prefix: &str| -> Result<Digits, DataError> {
            let (images_path, images) = read_either(dir, &format!("{prefix}-images-idx3-ubyte"))?;
            let (labels_path, labels) = read_either(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
            parse_pair(
                &images_path.display().to_string(),
                &images,
                &labels_path.display().to_string(),
                &labels,
            )
        };
        Ok(Mnist {
            train: split("train")?,
            valid: split("t10k")?,
        })
    }
}

/// Reads `dir/name`, or `dir/name.gz` when the first does not exist.
fn read_either(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>), DataError> {
    let raw = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    let path = if raw.exists() || !gz.exists() {
        raw
    } else {
        gz
    };
    let bytes = std::fs::read(&path).map_err(|source| DataError::Io {
        file: path.display().to_string(),
        source,
    })?;
    Ok((path, bytes))
}

/// Parses an images file and its labels file and checks that they agree.
pub fn parse_pair(
    images_file: &str,
    images: &[u8],
    labels_file: &str,
    labels: &[u8],
) -> Result<Digits, DataError> {
    let pixels = parse_images(images_file, images)?;
    let labels_vec = parse_labels(labels_file, labels)?;
    let count = pixels.len() / IMAGE_PIXELS;
    if count != labels_vec.len() {
        return Err(DataError::CountMismatch {
            images_file: images_file.into(),
            images: count,
            labels_file: labels_file.into(),
            labels: labels_vec.len(),
        });
    }
    Ok(Digits {
        pixels,
        labels: labels_vec,
    })
}

/// The pixels of an IDX images file (gzip or raw), `count * 784` bytes.
pub fn parse_images(file: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let bytes = gunzip_if_needed(file, bytes)?;
    let header = header(file, &bytes, IMAGES_MAGIC, 16)?;
    let (count, rows, cols) = (header[0], header[1], header[2]);
    if rows != IMAGE_SIDE || cols != IMAGE_SIDE {
        return Err(DataError::ImageSize {
            file: file.into(),
            rows,
            cols,
        });
    }
    let expected = count
        .checked_mul(IMAGE_PIXELS)
        .and_then(|n| n.checked_add(16))
        .unwrap_or(usize::MAX);
    payload(file, bytes, 16, expected)
}

/// The labels of an IDX labels file (gzip or raw).
pub fn parse_labels(file: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    let bytes = gunzip_if_needed(file, bytes)?;
    let header = header(file, &bytes, LABELS_MAGIC, 8)?;
    let expected = header[0].saturating_add(8);
    payload(file, bytes, 8, expected)
}

/// Checks the magic number and returns the header's dimensions.
fn header(file: &str, bytes: &[u8], magic: u32, size: usize) -> Result<Vec<usize>, DataError> {
    let truncated = |expected: usize| DataError::Truncated {
        file: file.into(),
        expected,
        got: bytes.len(),
    };
    if bytes.len() < 4 {
        return Err(truncated(size));
    }
    let word = |i: usize| u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
    if word(0) != magic {
        return Err(DataError::Magic {
            file: file.into(),
            expected: magic,
            got: word(0),
        });
    }
    if bytes.len() < size {
        return Err(truncated(size));
    }
    Ok((1..size / 4).map(|i| word(i) as usize).collect())
}

fn payload(
    file: &str,
    mut bytes: Vec<u8>,
    start: usize,
    expected: usize,
) -> Result<Vec<u8>, DataError> {
    if bytes.len() < expected {
        return Err(DataError::Truncated {
            file: file.into(),
            expected,
            got: bytes.len(),
        });
    }
    bytes.truncate(expected);
    Ok(bytes.split_off(start))
}

fn gunzip_if_needed(file: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|source| DataError::Gzip {
            file: file.into(),
            source,
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(count: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IMAGES_MAGIC, count, rows, cols] {
            bytes.extend(word.to_be_bytes());
        }
        bytes.extend(std::iter::repeat_n(7u8, pixels));
        bytes
    }

    fn idx_labels(count: u32, labels: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [LABELS_MAGIC, count] {
            bytes.extend(word.to_be_bytes());
        }
        bytes.extend(std::iter::repeat_n(3u8, labels));
        bytes
    }

    #[test]
    fn embedded_digits_split_9000_1000() {
        let mnist = Mnist::embedded();
        assert_eq!(mnist.train.len(), 9_000);
        assert_eq!(mnist.valid.len(), 1_000);
        assert_eq!(mnist.train.pixels.len(), 9_000 * IMAGE_PIXELS);
        assert!(mnist.valid.labels.iter().all(|&l| l < 10));
        // Real digits: mostly background, some ink.
        let ink = mnist.train.pixels.iter().filter(|&&p| p > 128).count() as f64;
        let share = ink / mnist.train.pixels.len() as f64;
        assert!((0.05..0.3).contains(&share), "ink share {share}");
    }

    #[test]
    fn a_directory_of_standard_files_loads_raw_or_gzip() {
        let dir = std::env::temp_dir().join(format!("vqvae-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Training files gzip (the embedded ones), validation files raw.
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), EMBEDDED_IMAGES).unwrap();
        std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), EMBEDDED_LABELS).unwrap();
        std::fs::write(
            dir.join("t10k-images-idx3-ubyte"),
            idx_images(3, 28, 28, 3 * IMAGE_PIXELS),
        )
        .unwrap();
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(3, 3)).unwrap();
        let mnist = Mnist::from_dir(&dir).unwrap();
        assert_eq!(mnist.train.len(), 10_000);
        assert_eq!(mnist.valid.len(), 3);
        assert_eq!(mnist.valid.labels, vec![3, 3, 3]);
        // A label file that disagrees is named in the error.
        std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(2, 2)).unwrap();
        let error = Mnist::from_dir(&dir).unwrap_err().to_string();
        assert!(
            error.contains("t10k-labels-idx1-ubyte holds 2 labels"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raw_and_gzip_parse_alike() {
        let raw = idx_images(2, 28, 28, 2 * IMAGE_PIXELS);
        let mut gz = Vec::new();
        {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
            encoder.write_all(&raw).unwrap();
        }
        assert_eq!(
            parse_images("a", &raw).unwrap(),
            parse_images("b", &gz).unwrap()
        );
    }

    #[test]
    fn bad_files_name_the_file_and_the_fault() {
        let wrong_magic = idx_labels(2, 2);
        let error = parse_images("x-images", &wrong_magic).unwrap_err();
        assert!(matches!(error, DataError::Magic { .. }), "{error}");
        assert!(
            error
                .to_string()
                .starts_with("x-images: magic number 0x00000801"),
            "{error}"
        );

        let truncated = idx_images(3, 28, 28, 2 * IMAGE_PIXELS);
        let error = parse_images("t-images", &truncated).unwrap_err();
        assert!(error.to_string().contains("t-images: truncated"), "{error}");

        let error = parse_images("h", &[0, 0, 8]).unwrap_err();
        assert!(matches!(
            error,
            DataError::Truncated {
                expected: 16,
                got: 3,
                ..
            }
        ));

        let small = idx_images(1, 8, 8, 64);
        assert!(matches!(
            parse_images("s", &small),
            Err(DataError::ImageSize { rows: 8, .. })
        ));

        let error = parse_pair(
            "i",
            &idx_images(2, 28, 28, 2 * IMAGE_PIXELS),
            "l",
            &idx_labels(3, 3),
        )
        .unwrap_err();
        assert_eq!(error.to_string(), "i holds 2 images but l holds 3 labels");

        let error = parse_images("g", &[0x1f, 0x8b, 1, 2, 3]).unwrap_err();
        assert!(matches!(error, DataError::Gzip { .. }), "{error}");

        let error = Mnist::from_dir(Path::new("/nonexistent-dir")).unwrap_err();
        assert!(
            error.to_string().contains("train-images-idx3-ubyte"),
            "{error}"
        );
    }
}
