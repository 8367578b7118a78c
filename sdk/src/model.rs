//! Models by content hash: a named set of tensors (weights) read from `.npy`, `.npz` or
//! `.safetensors`, identified by blake3 over its tensors' names and content ids, so the same
//! weights are the same model whatever file they came from.
//!
//! [`crate::Graph::model`] puts a model's tensors in a graph without copying or hashing them
//! again; a worker that already holds them (an earlier job sent them) is sent their ids, not
//! their bytes, so batch prediction over many inputs moves only the inputs.
//!
//! ```
//! use corvid_sdk::{Graph, Model, kernels::Tensor as Data};
//!
//! let m = Model::new("mlp", [("w", Data::from_f32([2, 2], vec![1.0, 0.0, 0.0, 1.0])?)]);
//! let g = Graph::new("predict");
//! let w = g.model(&m);
//! let y = g.t(&[3.0, 4.0]).reshape(&[1, 2])?.matmul(&w["w"])?;
//! assert_eq!(y.eval()?.into_raw_vec_and_offset().0, vec![3.0, 4.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use corvid_kernels::{DType, Tensor as Data};

use crate::ids::ValueId;

/// A file that could not be read or written as a model, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ModelError {
    pub path: String,
    pub reason: String,
}

/// A named set of tensors with a content id.
#[derive(Clone, Debug)]
pub struct Model {
    name: String,
    tensors: BTreeMap<String, (Arc<Data>, ValueId)>,
    id: ValueId,
}

impl Model {
    /// A model from named tensors (hashed once, here).
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        tensors: impl IntoIterator<Item = (S, Data)>,
    ) -> Model {
        let tensors: BTreeMap<String, (Arc<Data>, ValueId)> = tensors
            .into_iter()
            .map(|(n, d)| {
                let id = d.content_id().into();
                (n.into(), (Arc::new(d), id))
            })
            .collect();
        let mut h = blake3::Hasher::new();
        h.update(b"corvid model v1");
        for (n, (_, id)) in &tensors {
            h.update(&(n.len() as u64).to_le_bytes());
            h.update(n.as_bytes());
            h.update(&id.0);
        }
        Model {
            name: name.into(),
            tensors,
            id: ValueId(*h.finalize().as_bytes()),
        }
    }

    /// Reads a model by the file's extension: `.npy` (one tensor, named by the file's stem),
    /// `.npz` (each array by its name) or `.safetensors`. f32 and i32 are kept; f64 becomes f32
    /// and i64 i32 (refused if a value does not fit).
    pub fn load(path: impl AsRef<Path>) -> Result<Model, ModelError> {
        let path = path.as_ref();
        let fail = |reason: String| ModelError {
            path: path.display().to_string(),
            reason,
        };
        let stem = path
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let tensors = match ext.as_deref() {
            Some("npy") => {
                let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
                vec![(stem.clone(), read_npy(&bytes).map_err(fail)?)]
            }
            Some("npz") => read_npz(path).map_err(fail)?,
            Some("safetensors") => {
                let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
                read_safetensors(&bytes).map_err(fail)?
            }
            _ => {
                return Err(fail(
                    "not a model file: .npy, .npz or .safetensors expected".into(),
                ));
            }
        };
        Ok(Model::new(stem, tensors))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// blake3 over the tensors' names and content ids.
    pub fn id(&self) -> ValueId {
        self.id
    }

    /// The tensors' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensors by name, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Data)> {
        self.tensors.iter().map(|(n, (t, _))| (n.as_str(), &**t))
    }

    pub fn get(&self, name: &str) -> Option<&Data> {
        self.tensors.get(name).map(|(d, _)| &**d)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes of all its tensors.
    pub fn bytes(&self) -> u64 {
        self.tensors.values().map(|(d, _)| d.meta().bytes()).sum()
    }

    /// Each tensor with its content id (what [`crate::Graph::model`] puts in a graph).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &Arc<Data>, ValueId)> {
        self.tensors.iter().map(|(n, (d, id))| (n.as_str(), d, *id))
    }

    /// Writes the model as `.safetensors`.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<(), ModelError> {
        save_safetensors(
            path,
            self.tensors.iter().map(|(n, (d, _))| (n.as_str(), &**d)),
        )
    }
}

/// Writes one tensor as `.npy`.
pub fn save_npy(path: impl AsRef<Path>, data: &Data) -> Result<(), ModelError> {
    let path = path.as_ref();
    let fail = |reason: String| ModelError {
        path: path.display().to_string(),
        reason,
    };
    let written = match data.dtype() {
        DType::F32 => data
            .to_array_f32()
            .map_err(|e| e.to_string())
            .and_then(|a| ndarray_npy::write_npy(path, &a).map_err(|e| e.to_string())),
        DType::I32 => data
            .to_array_i32()
            .map_err(|e| e.to_string())
            .and_then(|a| ndarray_npy::write_npy(path, &a).map_err(|e| e.to_string())),
    };
    written.map_err(fail)
}

/// Writes named tensors as one `.safetensors` file.
pub fn save_safetensors<'a>(
    path: impl AsRef<Path>,
    tensors: impl IntoIterator<Item = (&'a str, &'a Data)>,
) -> Result<(), ModelError> {
    let path = path.as_ref();
    let fail = |reason: String| ModelError {
        path: path.display().to_string(),
        reason,
    };
    let owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, d)| {
            let dtype = match d.dtype() {
                DType::F32 => safetensors::Dtype::F32,
                DType::I32 => safetensors::Dtype::I32,
            };
            (n.to_string(), dtype, d.shape().to_vec(), d.to_le_bytes())
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
                .map_err(|e| fail(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| fail(e.to_string()))
}

fn read_npy(bytes: &[u8]) -> Result<Data, String> {
    use ndarray::ArrayD;
    use ndarray_npy::ReadNpyExt;
    any_dtype(
        || ArrayD::<f32>::read_npy(bytes).map_err(|e| e.to_string()),
        || ArrayD::<i32>::read_npy(bytes).map_err(|e| e.to_string()),
        || ArrayD::<f64>::read_npy(bytes).map_err(|e| e.to_string()),
        || ArrayD::<i64>::read_npy(bytes).map_err(|e| e.to_string()),
    )
}

/// The first of the readings that works: f32, i32, f64 (made f32), i64 (made i32).
fn any_dtype(
    f32s: impl FnOnce() -> Result<ndarray::ArrayD<f32>, String>,
    i32s: impl FnOnce() -> Result<ndarray::ArrayD<i32>, String>,
    f64s: impl FnOnce() -> Result<ndarray::ArrayD<f64>, String>,
    i64s: impl FnOnce() -> Result<ndarray::ArrayD<i64>, String>,
) -> Result<Data, String> {
    let first = match f32s() {
        Ok(a) => return Ok(Data::from_array(a)),
        Err(e) => e,
    };
    if let Ok(a) = i32s() {
        return Ok(Data::from_array_i32(a));
    }
    if let Ok(a) = f64s() {
        return Ok(Data::from_array(a.mapv(|v| v as f32)));
    }
    match i64s() {
        Ok(a) => {
            if let Some(v) = a.iter().find(|v| i32::try_from(**v).is_err()) {
                return Err(format!("the int64 value {v} does not fit in i32"));
            }
            Ok(Data::from_array_i32(a.mapv(|v| v as i32)))
        }
        Err(_) => Err(format!(
            "{first} (corvid reads f32, f64, i32 and i64 arrays)"
        )),
    }
}

/// Array `i` of an `.npz`, read as `T`.
fn npz_entry<T: ndarray_npy::ReadableElement>(
    npz: &std::cell::RefCell<&mut ndarray_npy::NpzReader<std::fs::File>>,
    i: usize,
) -> Result<ndarray::ArrayD<T>, String> {
    npz.borrow_mut()
        .by_index::<ndarray::OwnedRepr<T>, ndarray::IxDyn>(i)
        .map_err(|e| e.to_string())
}

fn read_npz(path: &Path) -> Result<Vec<(String, Data)>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut npz = ndarray_npy::NpzReader::new(file).map_err(|e| format!("not an .npz: {e}"))?;
    let names = npz.names().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let npz = std::cell::RefCell::new(&mut npz);
        let data = any_dtype(
            || npz_entry(&npz, i),
            || npz_entry(&npz, i),
            || npz_entry(&npz, i),
            || npz_entry(&npz, i),
        )
        .map_err(|e| format!("{name}: {e}"))?;
        out.push((name, data));
    }
    Ok(out)
}

fn read_safetensors(bytes: &[u8]) -> Result<Vec<(String, Data)>, String> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 | Dtype::I32 => {
                let dtype = if view.dtype() == Dtype::F32 {
                    DType::F32
                } else {
                    DType::I32
                };
                Data::from_le_bytes(dtype, shape, raw)
            }
            Dtype::F64 => {
                let v: Vec<f32> = raw
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                    .collect();
                Data::from_f32(shape, v)
            }
            Dtype::I64 => {
                let v = raw
                    .chunks_exact(8)
                    .map(|c| {
                        let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                        i32::try_from(v)
                            .map_err(|_| format!("{name}: the int64 value {v} does not fit in i32"))
                    })
                    .collect::<Result<Vec<i32>, _>>()?;
                Data::from_i32(shape, v)
            }
            other => {
                return Err(format!(
                    "{name}: dtype {other:?} (corvid reads F32, F64, I32 and I64)"
                ));
            }
        };
        out.push((name, data.map_err(|e| e.to_string())?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Model {
        Model::new(
            "m",
            [
                (
                    "w",
                    Data::from_f32([2, 3], vec![1., 2., 3., 4., 5., 6.]).unwrap(),
                ),
                ("labels", Data::from_i32([3], vec![7, -1, 0]).unwrap()),
            ],
        )
    }

    #[test]
    fn the_id_depends_on_names_and_content_only() {
        let (a, b) = (sample(), sample());
        assert_eq!(a.id(), b.id());
        let tensors = |m: &Model| -> Vec<(String, Data)> {
            m.names()
                .map(|n| (n.to_string(), m.get(n).unwrap().clone()))
                .collect()
        };
        let renamed = Model::new("other name", tensors(&a));
        assert_eq!(
            renamed.id(),
            a.id(),
            "the model's own name is not part of its id"
        );
        let w = a.get("w").unwrap().clone();
        let (one, other) = (
            Model::new("m", [("w", w.clone())]),
            Model::new("m", [("v", w)]),
        );
        assert_ne!(one.id(), a.id(), "every tensor is part of the id");
        assert_ne!(one.id(), other.id(), "a tensor's name is part of the id");
    }

    #[test]
    fn safetensors_and_npy_round_trip_with_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        let st = dir.path().join("m.safetensors");
        m.save_safetensors(&st).unwrap();
        let back = Model::load(&st).unwrap();
        assert_eq!(back.id(), m.id());
        assert_eq!(back.get("labels").unwrap().as_i32().unwrap(), &[7, -1, 0]);

        let npy = dir.path().join("w.npy");
        save_npy(&npy, m.get("w").unwrap()).unwrap();
        let one = Model::load(&npy).unwrap();
        assert_eq!(one.names().collect::<Vec<_>>(), ["w"]);
        assert_eq!(
            one.get("w").unwrap().content_id(),
            m.get("w").unwrap().content_id()
        );
    }

    #[test]
    fn bad_files_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, b"not a model").unwrap();
        let e = Model::load(&p).unwrap_err().to_string();
        assert!(e.contains("m.safetensors"), "{e}");
        let e = Model::load(dir.path().join("weights.bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(".npz"), "{e}");
        let e = Model::load(dir.path().join("missing.npz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.npz"), "{e}");
    }
}
