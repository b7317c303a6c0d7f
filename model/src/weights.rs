//! Memory-mapped safetensors checkpoints, single-file or sharded with an
//! index, read tensor by tensor: only the keys a caller asks for are copied
//! out of the mapping (a worker asks only for its experts).

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata};
use tch::{Device, Kind, Tensor};

use crate::error::WeightsError;
use crate::weight_matrix::WeightMatrix;
use tramontane_config::Quantization;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";
const HEADER_LEN_BYTES: usize = 8;
/// The `quantization_config.quant_method`s whose weights load as stored.
const SERVED_QUANTIZATIONS: [&str; 2] = ["fp8", "mxfp4"];
/// MXFP4's block: values per E8M0 scale.
const MXFP4_BLOCK: i64 = tramontane_kernels::MXFP4_BLOCK as i64;

struct WeightFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

/// Called with the number of bytes of each tensor as it is loaded.
pub type ProgressFn = Box<dyn Fn(u64)>;

/// The weights of one checkpoint folder.
pub struct Checkpoint {
    /// config.json's `quantization_config.quant_method`, where it has one.
    quant_method: Option<String>,
    /// An FP8 weight's block (`weight_block_size`; 128 × 128 by default).
    fp8_block: (i64, i64),
    files: Vec<WeightFile>,
    location: HashMap<String, usize>,
    loaded_bytes: Cell<u64>,
    progress: Option<ProgressFn>,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Maps `model.safetensors`, or every file named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut files = Vec::new();
        let mut location = HashMap::new();
        if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|error| WeightsError::Io {
                path: index_path.clone(),
                error,
            })?;
            let index: Index = serde_json::from_str(&text).map_err(|e| WeightsError::Index {
                path: index_path.clone(),
                reason: e.to_string(),
            })?;
            let mut file_of_name: HashMap<String, usize> = HashMap::new();
            for (key, name) in index.weight_map {
                if name.contains('/') || name.contains("..") {
                    return Err(WeightsError::Index {
                        path: index_path,
                        reason: format!("file name {name:?} must be a plain file name"),
                    });
                }
                let file = match file_of_name.get(&name) {
                    Some(&i) => i,
                    None => {
                        files.push(WeightFile::open(&dir.join(&name))?);
                        file_of_name.insert(name, files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[file].metadata.info(&key).is_none() {
                    return Err(WeightsError::Index {
                        path: index_path,
                        reason: format!(
                            "{key} is mapped to {} but that file does not hold it",
                            files[file].path.display()
                        ),
                    });
                }
                location.insert(key, file);
            }
        } else if single_path.exists() {
            let file = WeightFile::open(&single_path)?;
            for key in file.metadata.tensors().keys() {
                location.insert(key.clone(), 0);
            }
            files.push(file);
        } else {
            return Err(WeightsError::NoWeights {
                dir: dir.to_owned(),
            });
        }
        let said = quantization_config(dir)?;
        if let Some(quant_method) = said
            .as_ref()
            .and_then(|q| q.quant_method.as_deref())
            .filter(|method| !SERVED_QUANTIZATIONS.contains(method))
        {
            return Err(WeightsError::UnsupportedQuantization {
                quant_method: quant_method.into(),
                served: "\"fp8\" (e4m3 weights in blocks with weight_scale_inv) and \"mxfp4\" \
                         (gpt-oss's experts as _blocks and _scales)",
            });
        }
        Ok(Self {
            quant_method: said.as_ref().and_then(|q| q.quant_method.clone()),
            fp8_block: match said.and_then(|q| q.weight_block_size).as_deref() {
                Some(&[rows, columns]) if rows > 0 && columns > 0 => (rows as i64, columns as i64),
                Some(other) => {
                    return Err(WeightsError::Config {
                        path: dir.join("config.json"),
                        reason: format!(
                            "quantization_config.weight_block_size must be two positive sizes, not {other:?}"
                        ),
                    });
                }
                None => (128, 128),
            },
            files,
            location,
            loaded_bytes: Cell::new(0),
            progress: None,
        })
    }

    /// Refuses to quantize at load (`asked`) a checkpoint already
    /// quantized.
    pub fn check_quantization(&self, asked: Option<Quantization>) -> Result<(), WeightsError> {
        match (asked, &self.quant_method) {
            (Some(asked), Some(quant_method)) => Err(WeightsError::AlreadyQuantized {
                quant_method: quant_method.clone(),
                asked,
            }),
            _ => Ok(()),
        }
    }

    /// Reports each loaded tensor's size in bytes, e.g. to a progress bar.
    pub fn set_progress(&mut self, progress: ProgressFn) {
        self.progress = Some(progress);
    }

    /// All tensor names in the checkpoint.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.location.contains_key(key)
    }

    /// Bytes stored on disk for the keys that `wanted` accepts.
    pub fn stored_bytes(&self, wanted: impl Fn(&str) -> bool) -> u64 {
        self.location
            .iter()
            .filter(|(key, _)| wanted(key))
            .filter_map(|(key, &file)| self.files[file].metadata.info(key))
            .map(|info| (info.data_offsets.1 - info.data_offsets.0) as u64)
            .sum()
    }

    /// Bytes copied out of the files so far.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_bytes.get()
    }

    /// Copies one tensor out of the mapping, checks its shape and converts it
    /// to `kind` on `device` (an FP8 one dequantized by its block scales).
    pub fn load(
        &self,
        key: &str,
        expected_shape: &[i64],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor, WeightsError> {
        let stored = self.stored(key, Some(expected_shape), device)?;
        if stored.kind() == Kind::Float8e4m3fn {
            let held = self.fp8(key, stored, device)?;
            return held
                .as_ref()
                .dequantize(kind)
                .map_err(|error| WeightsError::Torch {
                    key: key.into(),
                    error,
                });
        }
        stored.f_to_kind(kind).map_err(|error| WeightsError::Torch {
            key: key.into(),
            error,
        })
    }

    /// A projection's weight `[outputs, inner]` as the experts hold it: an
    /// FP8 one as stored (its values and block scales, never expanded),
    /// any other in `kind`, quantized where `quantization` says (from the
    /// checkpoint's own values, read in f32).
    pub fn load_matrix(
        &self,
        key: &str,
        expected_shape: [i64; 2],
        (kind, quantization): (Kind, Option<Quantization>),
        device: Device,
    ) -> Result<WeightMatrix, WeightsError> {
        let torch_err = |error| WeightsError::Torch {
            key: key.into(),
            error,
        };
        let stored = self.stored(key, Some(&expected_shape), device)?;
        if stored.kind() == Kind::Float8e4m3fn {
            return self.fp8(key, stored, device);
        }
        let read_as = if quantization.is_some() {
            Kind::Float
        } else {
            kind
        };
        let w = stored.f_to_kind(read_as).map_err(torch_err)?;
        WeightMatrix::new(w, quantization).map_err(torch_err)
    }

    /// Whether the checkpoint stores its experts in MXFP4.
    pub fn mxfp4(&self) -> bool {
        self.quant_method.as_deref() == Some("mxfp4")
    }

    /// Entry `index` of the first dimension of tensor `key` (one expert of
    /// a fused tensor), copied out as stored; the tensor must be
    /// `[count, rest...]`.
    pub fn load_entry(
        &self,
        key: &str,
        (index, count): (usize, usize),
        rest: &[i64],
        device: Device,
    ) -> Result<Tensor, WeightsError> {
        let mut expected = vec![count as i64];
        expected.extend_from_slice(rest);
        self.stored_part(key, &expected, Some(index), device)
    }

    /// Expert `index` of `count` of the MXFP4 weight `key` (`{key}_blocks`
    /// `[count, outputs, inner / 32, 16]` and `{key}_scales` `[count,
    /// outputs, inner / 32]`, bytes), held as stored: `[outputs, inner /
    /// 2]` blocks and `[outputs, inner / 32]` scales.
    pub fn load_mxfp4_entry(
        &self,
        key: &str,
        (index, count): (usize, usize),
        [outputs, inner]: [i64; 2],
        device: Device,
    ) -> Result<WeightMatrix, WeightsError> {
        let groups = inner / MXFP4_BLOCK;
        let count = count as i64;
        let mut parts = Vec::new();
        for (suffix, needed) in [
            ("blocks", vec![count, outputs, groups, MXFP4_BLOCK / 2]),
            ("scales", vec![count, outputs, groups]),
        ] {
            let name = format!("{key}_{suffix}");
            let found = self.shape(&name)?;
            if inner % MXFP4_BLOCK != 0 || found != needed {
                return Err(WeightsError::Mxfp4Shape {
                    key: name,
                    found,
                    needed,
                    outputs,
                    inner,
                });
            }
            let part = self.stored_part(&name, &needed, Some(index), device)?;
            if part.kind() != Kind::Uint8 {
                return Err(WeightsError::UnsupportedDtype {
                    key: name,
                    dtype: format!("{:?} (MXFP4 blocks and scales are U8)", part.kind()),
                });
            }
            parts.push(part);
        }
        let torch = |error| WeightsError::Torch {
            key: key.into(),
            error,
        };
        let scales = parts.pop().expect("two parts");
        let blocks = parts.pop().expect("two parts");
        Ok(WeightMatrix::Mxfp4 {
            blocks: blocks.f_reshape([outputs, inner / 2]).map_err(torch)?,
            scales,
        })
    }

    /// The shape of tensor `key` as stored.
    fn shape(&self, key: &str) -> Result<Vec<i64>, WeightsError> {
        let &file = self
            .location
            .get(key)
            .ok_or_else(|| WeightsError::MissingTensor { key: key.into() })?;
        let info = self.files[file]
            .metadata
            .info(key)
            .ok_or_else(|| WeightsError::MissingTensor { key: key.into() })?;
        Ok(info.shape.iter().map(|&d| d as i64).collect())
    }

    /// The FP8 weight `key` (its values, `stored`) with its
    /// `{key}_scale_inv`, whose shape must be the weight's blocks'.
    fn fp8(&self, key: &str, values: Tensor, device: Device) -> Result<WeightMatrix, WeightsError> {
        let scale_key = format!("{key}_scale_inv");
        let scales = self.stored(&scale_key, None, device)?;
        let block = self.fp8_block;
        let (size, found) = (values.size(), scales.size());
        let needed = [
            (size[0] + block.0 - 1) / block.0,
            (size[1] + block.1 - 1) / block.1,
        ];
        if found != needed {
            return Err(WeightsError::Fp8Scales {
                key: scale_key,
                found,
                needed: needed.to_vec(),
                weight: size,
                block,
            });
        }
        let scales = scales
            .f_to_kind(Kind::Float)
            .and_then(|s| s.f_contiguous())
            .map_err(|error| WeightsError::Torch {
                key: scale_key.clone(),
                error,
            })?;
        Ok(WeightMatrix::Fp8 {
            values,
            scales,
            block,
        })
    }

    /// One tensor copied out of the mapping as stored, onto `device`, its
    /// shape checked where `expected_shape` is given.
    fn stored(
        &self,
        key: &str,
        expected_shape: Option<&[i64]>,
        device: Device,
    ) -> Result<Tensor, WeightsError> {
        match expected_shape {
            Some(shape) => self.stored_part(key, shape, None, device),
            None => {
                let shape = self.shape(key)?;
                self.stored_part(key, &shape, None, device)
            }
        }
    }

    /// Tensor `key` of shape `expected_shape`, or only its entry `entry`
    /// of the first dimension, copied out of the mapping as stored onto
    /// `device`.
    fn stored_part(
        &self,
        key: &str,
        expected_shape: &[i64],
        entry: Option<usize>,
        device: Device,
    ) -> Result<Tensor, WeightsError> {
        let &file = self
            .location
            .get(key)
            .ok_or_else(|| WeightsError::MissingTensor { key: key.into() })?;
        let file = &self.files[file];
        let info = file
            .metadata
            .info(key)
            .ok_or_else(|| WeightsError::MissingTensor { key: key.into() })?;
        let actual: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if actual != expected_shape || entry.is_some_and(|e| e as i64 >= actual[0]) {
            return Err(WeightsError::ShapeMismatch {
                key: key.into(),
                expected: expected_shape.to_vec(),
                actual,
            });
        }
        let stored_kind = kind_of(info.dtype).ok_or_else(|| WeightsError::UnsupportedDtype {
            key: key.into(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (mut start, mut end) = info.data_offsets;
        let mut actual = actual;
        if let Some(entry) = entry {
            let each = (end - start) / actual[0] as usize;
            (start, end) = (start + entry * each, start + (entry + 1) * each);
            actual.remove(0);
        }
        let bytes = &file.mmap[file.data_start + start..file.data_start + end];
        let torch_err = |error| WeightsError::Torch {
            key: key.into(),
            error,
        };
        let tensor = Tensor::f_from_data_size(bytes, &actual, stored_kind)
            .map_err(torch_err)?
            .f_to_device(device)
            .map_err(torch_err)?;
        let n = bytes.len() as u64;
        self.loaded_bytes.set(self.loaded_bytes.get() + n);
        if let Some(progress) = &self.progress {
            progress(n);
        }
        Ok(tensor)
    }
}

impl WeightFile {
    fn open(path: &Path) -> Result<Self, WeightsError> {
        let io = |error| WeightsError::Io {
            path: path.to_owned(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the mapping is read-only and checkpoint files are not
        // modified while a server runs; a concurrent writer is outside the contract.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::Corrupt {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            path: path.to_owned(),
            mmap,
            data_start: HEADER_LEN_BYTES + header_len,
            metadata,
        })
    }
}

/// The `quantization_config` of `dir`'s config.json (None without one, or
/// without a config.json: a folder of weights alone).
fn quantization_config(
    dir: &Path,
) -> Result<Option<tramontane_config::dtype::QuantizationConfig>, WeightsError> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(WeightsError::Io { path, error }),
    };
    tramontane_config::dtype::quantization_config(&text).map_err(|error| WeightsError::Config {
        path,
        reason: error.to_string(),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        Dtype::F8_E4M3 => Some(Kind::Float8e4m3fn),
        Dtype::U8 => Some(Kind::Uint8),
        _ => None,
    }
}
