//! `corvid` for Python: the Rust SDK's graphs, ops and clients behind PyO3.
//!
//! ```python
//! import numpy as np, corvid
//! client = corvid.Client.local(2)             # or corvid.Client.connect([addr], psk=path)
//! g = corvid.Graph("demo", client)
//! x = g.tensor(np.ones((4, 3), np.float32))
//! y = (x @ g.random([3, 2], -1.0, 1.0, seed=1)).relu()
//! print(y.eval())                             # a NumPy array, verified
//! ```
//!
//! Every op is a method of `Tensor` (elementwise, reductions and the rest), Python's
//! operators build ops too, and a bad op raises `corvid.BuildError` at the line that built it,
//! naming the op and the shapes. Evaluation releases the GIL; `submit` returns a `Handle` that
//! the package's `corvid.Job` (a `concurrent.futures.Future`) wraps.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corvid_kernels::Op;
use corvid_kernels::Tensor as Data;
use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_sdk::EvalError as SdkEvalError;
use corvid_sdk::{Graph, JobHandle, LocalExecutor, Tensor};
use numpy::{IntoPyArray, PyReadonlyArrayDyn};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

create_exception!(
    corvid,
    CorvidError,
    PyException,
    "Anything Corvid refuses or fails at."
);
create_exception!(
    corvid,
    BuildError,
    CorvidError,
    "An op that cannot be built: its inputs' shapes or dtypes do not fit it."
);
create_exception!(
    corvid,
    EvalError,
    CorvidError,
    "An evaluation that failed: which op, where (the peer) and why."
);
create_exception!(corvid, Cancelled, EvalError, "The job was cancelled.");
create_exception!(
    corvid,
    ClientError,
    CorvidError,
    "A client that cannot join its swarm."
);

/// `file:line` of the Python code calling into the extension.
fn caller(py: Python<'_>) -> String {
    let frame = || -> PyResult<String> {
        let f = py.import("sys")?.call_method1("_getframe", (0,))?;
        let file: String = f.getattr("f_code")?.getattr("co_filename")?.extract()?;
        let line: u32 = f.getattr("f_lineno")?.extract()?;
        Ok(format!("{file}:{line}"))
    };
    frame().unwrap_or_else(|_| "<unknown>".into())
}

fn build_err(py: Python<'_>, e: corvid_sdk::BuildError) -> PyErr {
    // The Rust site is this extension's; the Python line that built the op replaces it.
    let text = e.to_string();
    let text = match text.split_once(": ") {
        Some((site, rest)) if site.contains(".rs:") => rest.to_string(),
        _ => text,
    };
    BuildError::new_err(format!("{text} (at {})", caller(py)))
}

/// A built tensor, or the op's error at the Python line that built it.
fn built(py: Python<'_>, r: Result<Tensor, corvid_sdk::BuildError>) -> PyResult<PyTensor> {
    r.map(|t| PyTensor { t }).map_err(|e| build_err(py, e))
}

fn eval_err(e: SdkEvalError) -> PyErr {
    match e {
        SdkEvalError::Cancelled => Cancelled::new_err(e.to_string()),
        SdkEvalError::Build { .. } => BuildError::new_err(e.to_string()),
        e => EvalError::new_err(e.to_string()),
    }
}

/// A node's tensor as a NumPy array (f32 or i32).
fn to_numpy<'py>(py: Python<'py>, d: &Data) -> PyResult<Bound<'py, PyAny>> {
    if let Ok(a) = d.to_array_f32() {
        return Ok(a.into_pyarray(py).into_any());
    }
    d.to_array_i32()
        .map(|a| a.into_pyarray(py).into_any())
        .map_err(|e| EvalError::new_err(e.to_string()))
}

/// A swarm to run graphs on: `Client.local(n)` starts `n` embedded workers (development);
/// `Client.connect(addrs, psk=None)` joins a real swarm as a requester.
#[pyclass(frozen, name = "Client", module = "corvid")]
struct PyClient {
    client: corvid_node::Client,
}

#[pymethods]
impl PyClient {
    #[staticmethod]
    fn local(py: Python<'_>, n: usize) -> PyResult<PyClient> {
        py.detach(|| corvid_node::Client::local(n))
            .map(|client| PyClient { client })
            .map_err(|e| ClientError::new_err(e.to_string()))
    }

    /// Joins the swarm through `addrs` (each `/ip4/…/tcp/…/p2p/<peer id>`), with the
    /// private-network key file `psk` if given; returns once `workers` workers are known.
    #[staticmethod]
    #[pyo3(signature = (addrs, psk = None, workers = 1, timeout = 60.0))]
    fn connect(
        py: Python<'_>,
        addrs: Vec<String>,
        psk: Option<std::path::PathBuf>,
        workers: usize,
        timeout: f64,
    ) -> PyResult<PyClient> {
        py.detach(|| {
            let mut b = corvid_node::Client::builder()
                .bootstraps(addrs)
                .wait_for_workers(workers, Duration::from_secs_f64(timeout.max(0.0)));
            if let Some(p) = psk {
                b = b.psk(p);
            }
            b.connect()
        })
        .map(|client| PyClient { client })
        .map_err(|e| ClientError::new_err(e.to_string()))
    }

    /// What the last job did: which peer ran what, bytes, time, checks.
    fn last_summary(&self) -> Option<String> {
        self.client.last_summary().map(|s| s.to_string())
    }
}

/// A graph of tensor ops, evaluated on `client`'s swarm (or on this machine without one).
#[pyclass(frozen, subclass, name = "Graph", module = "corvid")]
struct PyGraph {
    g: Graph,
}

#[pymethods]
impl PyGraph {
    #[new]
    #[pyo3(signature = (name = "graph", client = None))]
    fn new(name: &str, client: Option<&PyClient>) -> PyResult<PyGraph> {
        let g = Graph::new(name);
        let g = match client {
            Some(c) => g.with_executor(c.client.executor()),
            None => {
                let backend = corvid_kernels::Backend::open(corvid_kernels::BackendChoice::Cpu)
                    .map_err(|e| CorvidError::new_err(e.to_string()))?;
                g.with_executor(Arc::new(LocalExecutor::new(backend)))
            }
        };
        Ok(PyGraph { g })
    }

    #[getter]
    fn name(&self) -> String {
        self.g.name().to_string()
    }

    /// A constant tensor from a NumPy array (float32; other float arrays are converted).
    fn tensor(&self, py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        let array: PyReadonlyArrayDyn<'_, f32> = match array.extract() {
            Ok(a) => a,
            Err(_) => py
                .import("numpy")?
                .call_method1("asarray", (array, "float32"))?
                .extract()?,
        };
        Ok(PyTensor {
            t: self.g.from_array(array.as_array().to_owned()),
        })
    }

    /// A scalar constant.
    fn scalar(&self, value: f32) -> PyTensor {
        PyTensor {
            t: self.g.scalar(value),
        }
    }

    /// Uniform random values in [lo, hi) made from `seed` where they are used (only the
    /// recipe travels).
    #[pyo3(signature = (shape, lo = -1.0, hi = 1.0, seed = 0))]
    fn random(
        &self,
        py: Python<'_>,
        shape: Vec<usize>,
        lo: f32,
        hi: f32,
        seed: u64,
    ) -> PyResult<PyTensor> {
        let t = self.g.random(&shape, lo, hi, seed);
        t.check().map_err(|e| build_err(py, e))?;
        Ok(PyTensor { t })
    }

    /// Evaluates several tensors at once (sharing their common work): NumPy arrays.
    fn eval<'py>(
        &self,
        py: Python<'py>,
        outputs: Vec<PyRef<'py, PyTensor>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let ts: Vec<Tensor> = outputs.iter().map(|t| t.t.clone()).collect();
        let g = self.g.clone();
        let values = py
            .detach(move || g.eval(&ts.iter().collect::<Vec<_>>()))
            .map_err(eval_err)?;
        values.iter().map(|d| to_numpy(py, d)).collect()
    }

    /// Starts evaluating `outputs` and returns a `Handle` at once.
    fn submit(&self, outputs: Vec<PyRef<'_, PyTensor>>) -> PyResult<PyJob> {
        let ts: Vec<&Tensor> = outputs.iter().map(|t| &t.t).collect();
        let handle = self.g.submit(&ts).map_err(eval_err)?;
        Ok(PyJob {
            state: handle.state().clone(),
            inner: Mutex::new(JobSlot::Running(handle)),
        })
    }

    /// A model's tensors as constants of this graph, by name (not copied or hashed again).
    fn model(&self, model: &PyModel) -> std::collections::BTreeMap<String, PyTensor> {
        self.g
            .model(&model.m)
            .into_iter()
            .map(|(n, t)| (n, PyTensor { t }))
            .collect()
    }

    /// The gradients of the one-value `loss` with respect to each of `params`, as tensors of
    /// this graph (the backward pass is ordinary ops, run and verified like any others).
    fn grad(
        &self,
        py: Python<'_>,
        loss: &PyTensor,
        params: Vec<PyRef<'_, PyTensor>>,
    ) -> PyResult<Vec<PyTensor>> {
        let ps: Vec<&Tensor> = params.iter().map(|t| &t.t).collect();
        self.g
            .grad(&loss.t, &ps)
            .map(|gs| gs.into_iter().map(|t| PyTensor { t }).collect())
            .map_err(|e| build_err(py, e))
    }

    /// The graph's content id (blake3 of its canonical encoding), hex.
    fn id(&self) -> String {
        self.g.id().to_string()
    }

    /// `parts` joined along `axis`.
    fn concat(
        &self,
        py: Python<'_>,
        parts: Vec<PyRef<'_, PyTensor>>,
        axis: usize,
    ) -> PyResult<PyTensor> {
        let parts: Vec<&Tensor> = parts.iter().map(|t| &t.t).collect();
        built(py, self.g.concat(&parts, axis))
    }

    /// A constant from a `.npy` file.
    fn load_npy(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<PyTensor> {
        built(py, self.g.load_npy(path))
    }

    /// The partition the executor would run for `outputs`, without running it: a table of
    /// subgraphs (id, ops, inputs, cost).
    fn plan(&self, py: Python<'_>, outputs: Vec<PyRef<'_, PyTensor>>) -> PyResult<String> {
        let ts: Vec<&Tensor> = outputs.iter().map(|t| &t.t).collect();
        self.g
            .plan(&ts)
            .map(|p| p.describe())
            .map_err(|e| BuildError::new_err(format!("{e} (at {})", caller(py))))
    }

    /// Every op that failed to build or run, as a `CorvidError`; nothing when none did.
    fn end(&self) -> PyResult<()> {
        self.g
            .end()
            .map_err(|r| CorvidError::new_err(r.to_string()))
    }

    fn __len__(&self) -> usize {
        self.g.len()
    }
}

/// A tensor of a graph: every op is a method, and `+ - * / @` and unary `-` build ops.
#[pyclass(frozen, name = "Tensor", module = "corvid")]
struct PyTensor {
    t: Tensor,
}

impl PyTensor {
    fn apply(&self, py: Python<'_>, op: Op, others: &[&Tensor]) -> PyResult<PyTensor> {
        let mut args = vec![&self.t];
        args.extend_from_slice(others);
        built(py, self.t.graph().apply(op, &args))
    }

    /// `other` as a tensor of this graph: a tensor, or a number (a scalar constant).
    fn operand(&self, other: &Bound<'_, PyAny>) -> PyResult<Tensor> {
        if let Ok(t) = other.cast::<PyTensor>() {
            return Ok(t.get().t.clone());
        }
        let v: f32 = other.extract().map_err(|_| {
            BuildError::new_err(format!(
                "cannot combine a tensor with {}",
                other
                    .get_type()
                    .name()
                    .map_or_else(|_| "this".into(), |n| n.to_string())
            ))
        })?;
        Ok(self.t.graph().scalar(v))
    }

    fn binary(
        &self,
        py: Python<'_>,
        op: BinaryOp,
        other: &Bound<'_, PyAny>,
        reflected: bool,
    ) -> PyResult<PyTensor> {
        let o = self.operand(other)?;
        if reflected {
            PyTensor { t: o }.apply(py, Op::Binary(op), &[&self.t])
        } else {
            self.apply(py, Op::Binary(op), &[&o])
        }
    }
}

/// The arguments of a by-name op call, in the order of `params` (positional first, then by
/// keyword; `axis` is another name for `axes`); anything else is a `TypeError`.
fn bind<'py, const N: usize>(
    name: &str,
    args: &Bound<'py, PyTuple>,
    kwargs: Option<&Bound<'py, PyDict>>,
    params: &[&str; N],
) -> PyResult<[Option<Bound<'py, PyAny>>; N]> {
    let type_error = |m: String| pyo3::exceptions::PyTypeError::new_err(format!("{name}(): {m}"));
    if args.len() > N {
        return Err(type_error(format!(
            "takes at most {N} argument(s) ({}), {} given",
            params.join(", "),
            args.len()
        )));
    }
    let mut out: [Option<Bound<'py, PyAny>>; N] = std::array::from_fn(|i| args.get_item(i).ok());
    if let Some(kwargs) = kwargs {
        for (k, v) in kwargs.iter() {
            let k: String = k.extract()?;
            let key = if k == "axis" { "axes" } else { k.as_str() };
            let Some(i) = params.iter().position(|p| *p == key) else {
                return Err(type_error(format!("no argument '{k}'")));
            };
            if out[i].replace(v).is_some() {
                return Err(type_error(format!("'{k}' given twice")));
            }
        }
    }
    Ok(out)
}

fn unary_op(name: &str) -> Option<UnaryOp> {
    UnaryOp::ALL.iter().copied().find(|o| o.name() == name)
}

fn binary_op(name: &str) -> Option<BinaryOp> {
    BinaryOp::ALL.iter().copied().find(|o| o.name() == name)
}

fn reduce_op(name: &str) -> Option<ReduceOp> {
    ReduceOp::ALL.iter().copied().find(|o| o.name() == name)
}

#[pymethods]
impl PyTensor {
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.t.shape().to_vec()
    }

    #[getter]
    fn dtype(&self) -> String {
        self.t.dtype().to_string()
    }

    fn __repr__(&self) -> String {
        format!(
            "<corvid.Tensor {} of graph '{}'>",
            self.t.meta(),
            self.t.graph().name()
        )
    }

    /// Evaluates this tensor: a NumPy array.
    fn eval<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let t = self.t.clone();
        let d = py.detach(move || t.eval_data()).map_err(eval_err)?;
        to_numpy(py, &d)
    }

    /// The elementwise (`tensor.exp()`, `a.maximum(b)`) and reduction (`x.sum([0],
    /// keepdims=False)`) ops of the op set, by name.
    fn __getattr__<'py>(slf: Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyCFunction>> {
        let py = slf.py();
        let me: Py<PyTensor> = slf.clone().unbind();
        let missing = || {
            pyo3::exceptions::PyAttributeError::new_err(format!(
                "corvid.Tensor has no attribute or op '{name}'"
            ))
        };
        let name = name.to_string();
        if let Some(op) = unary_op(&name) {
            return PyCFunction::new_closure(
                py,
                None,
                None,
                move |args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>| {
                    bind(&name, args, kwargs, &[])?;
                    me.get().apply(args.py(), Op::Unary(op), &[])
                },
            );
        }
        if let Some(op) = binary_op(&name) {
            return PyCFunction::new_closure(
                py,
                None,
                None,
                move |args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>| {
                    let [other] = bind(&name, args, kwargs, &["other"])?;
                    let other = other.ok_or_else(|| {
                        pyo3::exceptions::PyTypeError::new_err(format!(
                            "{name}() needs another operand"
                        ))
                    })?;
                    me.get().binary(args.py(), op, &other, false)
                },
            );
        }
        if let Some(op) = reduce_op(&name) {
            return PyCFunction::new_closure(
                py,
                None,
                None,
                move |args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>| {
                    let me = me.get();
                    let [axes, keepdims] = bind(&name, args, kwargs, &["axes", "keepdims"])?;
                    // `axes`: a list, one axis, or None (all of them); NumPy's `axis` works too.
                    let axes: Vec<usize> = match axes.filter(|a| !a.is_none()) {
                        None => (0..me.t.shape().len()).collect(),
                        Some(a) => match a.extract::<usize>() {
                            Ok(one) => vec![one],
                            Err(_) => a.extract()?,
                        },
                    };
                    let keepdims = match keepdims {
                        Some(k) => k.extract()?,
                        None => false,
                    };
                    me.apply(args.py(), Op::Reduce { op, axes, keepdims }, &[])
                },
            );
        }
        Err(missing())
    }

    fn matmul(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        let o = self.operand(other)?;
        self.apply(py, Op::MatMul, &[&o])
    }

    fn softmax(&self, py: Python<'_>, axis: usize) -> PyResult<PyTensor> {
        built(py, self.t.softmax(axis))
    }

    fn log_softmax(&self, py: Python<'_>, axis: usize) -> PyResult<PyTensor> {
        built(py, self.t.log_softmax(axis))
    }

    fn transpose(&self, py: Python<'_>) -> PyResult<PyTensor> {
        built(py, self.t.transpose())
    }

    fn reshape(&self, py: Python<'_>, shape: Vec<usize>) -> PyResult<PyTensor> {
        built(py, self.t.reshape(&shape))
    }

    fn permute(&self, py: Python<'_>, axes: Vec<usize>) -> PyResult<PyTensor> {
        built(py, self.t.permute(&axes))
    }

    fn broadcast_to(&self, py: Python<'_>, shape: Vec<usize>) -> PyResult<PyTensor> {
        built(py, self.t.broadcast_to(&shape))
    }

    fn clamp(&self, py: Python<'_>, min: f32, max: f32) -> PyResult<PyTensor> {
        built(py, self.t.clamp(min, max))
    }

    /// The gradients of this one-value tensor (a loss) for each of `params`:
    /// `graph.grad(self, params)`.
    fn backward(
        &self,
        py: Python<'_>,
        params: Vec<PyRef<'_, PyTensor>>,
    ) -> PyResult<Vec<PyTensor>> {
        let ps: Vec<&Tensor> = params.iter().map(|t| &t.t).collect();
        self.t
            .graph()
            .grad(&self.t, &ps)
            .map(|gs| gs.into_iter().map(|t| PyTensor { t }).collect())
            .map_err(|e| build_err(py, e))
    }

    #[pyo3(signature = (axis, keepdims = false))]
    fn argmax(&self, py: Python<'_>, axis: usize, keepdims: bool) -> PyResult<PyTensor> {
        built(py, self.t.argmax(axis, keepdims))
    }

    fn layer_norm(
        &self,
        py: Python<'_>,
        gamma: PyRef<'_, PyTensor>,
        beta: PyRef<'_, PyTensor>,
        eps: f32,
    ) -> PyResult<PyTensor> {
        built(py, self.t.layer_norm(&gamma.t, &beta.t, eps))
    }

    /// `cond.select(a, b)`: `a` where `cond` is non-zero, else `b` (NumPy's `where`).
    fn select(
        &self,
        py: Python<'_>,
        a: &Bound<'_, PyAny>,
        b: &Bound<'_, PyAny>,
    ) -> PyResult<PyTensor> {
        let (a, b) = (self.operand(a)?, self.operand(b)?);
        built(py, self.t.select(&a, &b))
    }

    /// Converts to `"f32"` or `"i32"` (NumPy names work too).
    fn cast(&self, py: Python<'_>, dtype: &str) -> PyResult<PyTensor> {
        let to = match dtype {
            "f32" | "float32" => corvid_kernels::DType::F32,
            "i32" | "int32" => corvid_kernels::DType::I32,
            other => {
                return Err(BuildError::new_err(format!(
                    "op 'cast': no dtype '{other}' (f32 or i32) (at {})",
                    caller(py)
                )));
            }
        };
        built(py, self.t.cast(to))
    }

    /// One `(start, end, step)` per axis.
    fn slice(&self, py: Python<'_>, ranges: Vec<(usize, usize, usize)>) -> PyResult<PyTensor> {
        built(py, self.t.slice(&ranges))
    }

    /// One `(before, after)` per axis, filled with `value`.
    #[pyo3(signature = (pads, value = 0.0))]
    fn pad(&self, py: Python<'_>, pads: Vec<(usize, usize)>, value: f32) -> PyResult<PyTensor> {
        let pads: Vec<[usize; 2]> = pads.into_iter().map(|(a, b)| [a, b]).collect();
        built(py, self.t.pad(&pads, value))
    }

    /// NCHW input, OIHW weight.
    #[pyo3(signature = (weight, stride = (1, 1), padding = (0, 0)))]
    fn conv2d(
        &self,
        py: Python<'_>,
        weight: PyRef<'_, PyTensor>,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> PyResult<PyTensor> {
        built(
            py,
            self.t
                .conv2d(&weight.t, [stride.0, stride.1], [padding.0, padding.1]),
        )
    }

    /// NCHW input; the stride is the kernel's unless given.
    #[pyo3(signature = (kernel, stride = None, padding = (0, 0)))]
    fn max_pool2d(
        &self,
        py: Python<'_>,
        kernel: (usize, usize),
        stride: Option<(usize, usize)>,
        padding: (usize, usize),
    ) -> PyResult<PyTensor> {
        let stride = stride.unwrap_or(kernel);
        let pool = [kernel.0, kernel.1];
        built(
            py,
            self.t
                .max_pool2d(pool, [stride.0, stride.1], [padding.0, padding.1]),
        )
    }

    fn __add__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Add, o, false)
    }
    fn __radd__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Add, o, true)
    }
    fn __sub__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Sub, o, false)
    }
    fn __rsub__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Sub, o, true)
    }
    fn __mul__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Mul, o, false)
    }
    fn __rmul__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Mul, o, true)
    }
    fn __truediv__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Div, o, false)
    }
    fn __rtruediv__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.binary(py, BinaryOp::Div, o, true)
    }
    fn __matmul__(&self, py: Python<'_>, o: &Bound<'_, PyAny>) -> PyResult<PyTensor> {
        self.matmul(py, o)
    }
    /// `<`, `<=`, `>`, `>=` build comparison ops (1.0 where true); `==` and `!=` stay
    /// Python's identity (use `eq` and `ne`), so tensors remain hashable.
    fn __richcmp__(
        &self,
        py: Python<'_>,
        o: &Bound<'_, PyAny>,
        cmp: pyo3::basic::CompareOp,
    ) -> PyResult<Py<PyAny>> {
        use pyo3::basic::CompareOp as C;
        let op = match cmp {
            C::Lt => BinaryOp::Lt,
            C::Le => BinaryOp::Le,
            C::Gt => BinaryOp::Gt,
            C::Ge => BinaryOp::Ge,
            C::Eq | C::Ne => return Ok(py.NotImplemented()),
        };
        Ok(Py::new(py, self.binary(py, op, o, false)?)?.into_any())
    }
    fn __hash__(slf: &Bound<'_, Self>) -> usize {
        slf.as_ptr() as usize
    }
    fn __neg__(&self, py: Python<'_>) -> PyResult<PyTensor> {
        self.apply(py, Op::Unary(UnaryOp::Neg), &[])
    }
}

enum JobSlot {
    Running(JobHandle),
    /// The outputs, or the error and whether it was a cancel.
    Ended(Result<Vec<Data>, String>, bool),
}

/// A running job as the extension holds it (`corvid.Job`, a `concurrent.futures.Future`,
/// wraps it): `result(timeout=None)` waits for its NumPy arrays, `done()` asks, `cancel()`
/// stops it, `progress()` is (subgraphs done, subgraphs in all).
#[pyclass(frozen, name = "Handle", module = "corvid._corvid")]
struct PyJob {
    state: Arc<corvid_sdk::JobState>,
    inner: Mutex<JobSlot>,
}

impl PyJob {
    fn slot(&self) -> std::sync::MutexGuard<'_, JobSlot> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Polls the job; true once it has ended.
    fn poll(&self) -> bool {
        let mut slot = self.slot();
        if let JobSlot::Running(h) = &mut *slot {
            match h.try_wait() {
                Some(Ok(v)) => *slot = JobSlot::Ended(Ok(v), false),
                Some(Err(e)) => {
                    let cancelled = matches!(e, SdkEvalError::Cancelled);
                    *slot = JobSlot::Ended(Err(e.to_string()), cancelled)
                }
                None => return false,
            }
        }
        true
    }
}

#[pymethods]
impl PyJob {
    fn done(&self) -> bool {
        self.poll()
    }

    fn cancel(&self) -> bool {
        self.state.cancel();
        true
    }

    fn cancelled(&self) -> bool {
        self.state.is_cancelled()
    }

    /// What the job did (which peer ran what, bytes, checks), once it ended on a swarm.
    fn summary(&self) -> Option<String> {
        corvid_node::JobSummary::of_state(&self.state).map(|s| s.to_string())
    }

    fn progress(&self) -> (usize, usize) {
        let p = self.state.progress();
        (p.done, p.total)
    }

    /// The outputs as NumPy arrays, waiting up to `timeout` seconds (forever if None);
    /// raises the job's error, `corvid.Cancelled`, or `TimeoutError`.
    #[pyo3(signature = (timeout = None))]
    fn result<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let ended = py.detach(|| {
            let mut nap = Nap::default();
            loop {
                if self.poll() {
                    return true;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return false;
                }
                nap.take();
            }
        });
        if !ended {
            return Err(pyo3::exceptions::PyTimeoutError::new_err(
                "the job has not ended",
            ));
        }
        match &*self.slot() {
            JobSlot::Ended(Ok(values), _) => values.iter().map(|d| to_numpy(py, d)).collect(),
            JobSlot::Ended(Err(e), true) => Err(Cancelled::new_err(e.clone())),
            JobSlot::Ended(Err(e), false) => Err(EvalError::new_err(e.clone())),
            JobSlot::Running(_) => Err(CorvidError::new_err("the job has not ended")),
        }
    }

    /// As `result(0)`, handing the outputs over: the handle keeps none (`corvid.Job` holds
    /// them once).
    fn take_result<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let out = self.result(py, Some(0.0))?;
        if let JobSlot::Ended(Ok(values), _) = &mut *self.slot() {
            values.clear();
        }
        Ok(out)
    }
}

/// Waits up to `timeout` seconds (releasing the GIL) until one of `handles` has ended; the
/// indices of those that have (none if the time ran out).
#[pyfunction]
fn wait_any(py: Python<'_>, handles: Vec<Py<PyJob>>, timeout: f64) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    py.detach(|| {
        let mut nap = Nap::default();
        loop {
            let ended: Vec<usize> = (0..handles.len())
                .filter(|&i| handles[i].get().poll())
                .collect();
            if !ended.is_empty() || Instant::now() >= deadline {
                return ended;
            }
            nap.take();
        }
    })
}

/// The pause between polls of running jobs: short at first (small jobs end in
/// milliseconds), growing to 2 ms so that waiting on a long job costs next to no CPU.
struct Nap(Duration);

impl Default for Nap {
    fn default() -> Self {
        Nap(Duration::from_micros(50))
    }
}

impl Nap {
    fn take(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(2));
    }
}

/// A named set of tensors identified by its content hash: `Model.load(path)` reads `.npy`,
/// `.npz` or `.safetensors`; `Model(name, {"w": array, ...})` makes one from NumPy arrays.
#[pyclass(frozen, name = "Model", module = "corvid")]
struct PyModel {
    m: corvid_sdk::Model,
}

#[pymethods]
impl PyModel {
    #[new]
    fn new(
        name: &str,
        tensors: std::collections::BTreeMap<String, Bound<'_, PyAny>>,
    ) -> PyResult<PyModel> {
        let mut out = Vec::with_capacity(tensors.len());
        for (n, a) in tensors {
            out.push((n, from_numpy(&a)?));
        }
        Ok(PyModel {
            m: corvid_sdk::Model::new(name, out),
        })
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<PyModel> {
        py.detach(|| corvid_sdk::Model::load(&path))
            .map(|m| PyModel { m })
            .map_err(|e| CorvidError::new_err(e.to_string()))
    }

    #[getter]
    fn name(&self) -> String {
        self.m.name().to_string()
    }

    /// blake3 over the tensors' names and content ids, hex.
    #[getter]
    fn id(&self) -> String {
        self.m.id().to_string()
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.m.bytes()
    }

    fn names(&self) -> Vec<String> {
        self.m.names().map(String::from).collect()
    }

    fn __getitem__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        match self.m.get(name) {
            Some(d) => to_numpy(py, d),
            None => Err(pyo3::exceptions::PyKeyError::new_err(format!(
                "model '{}' has no tensor '{name}'",
                self.m.name()
            ))),
        }
    }

    fn __len__(&self) -> usize {
        self.m.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<corvid.Model '{}' {} tensors, {} bytes, id {}>",
            self.m.name(),
            self.m.len(),
            self.m.bytes(),
            &self.m.id().to_string()[..12]
        )
    }

    fn save_safetensors(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.detach(|| self.m.save_safetensors(&path))
            .map_err(|e| CorvidError::new_err(e.to_string()))
    }
}

/// A NumPy array (or anything `numpy.asarray` takes) as a node's tensor: int arrays become
/// i32, anything else f32.
fn from_numpy(a: &Bound<'_, PyAny>) -> PyResult<Data> {
    if let Ok(a) = a.extract::<PyReadonlyArrayDyn<'_, f32>>() {
        return Ok(Data::from_array(a.as_array().to_owned()));
    }
    if let Ok(a) = a.extract::<PyReadonlyArrayDyn<'_, i32>>() {
        return Ok(Data::from_array_i32(a.as_array().to_owned()));
    }
    let np = a.py().import("numpy")?;
    let kind: String = np
        .call_method1("asarray", (a,))?
        .getattr("dtype")?
        .getattr("kind")?
        .extract()?;
    let dtype = if kind == "i" || kind == "u" || kind == "b" {
        "int32"
    } else {
        "float32"
    };
    let conv = np.call_method1("ascontiguousarray", (a, dtype))?;
    from_numpy(&conv)
}

/// Writes an array as `.npy` (f32 or i32).
#[pyfunction]
fn save_npy(path: std::path::PathBuf, array: &Bound<'_, PyAny>) -> PyResult<()> {
    corvid_sdk::model::save_npy(&path, &from_numpy(array)?)
        .map_err(|e| CorvidError::new_err(e.to_string()))
}

/// Writes named arrays as one `.safetensors` file.
#[pyfunction]
fn save_safetensors(
    path: std::path::PathBuf,
    tensors: std::collections::BTreeMap<String, Bound<'_, PyAny>>,
) -> PyResult<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (n, a) in tensors {
        data.push((n, from_numpy(&a)?));
    }
    corvid_sdk::model::save_safetensors(&path, data.iter().map(|(n, d)| (n.as_str(), d)))
        .map_err(|e| CorvidError::new_err(e.to_string()))
}

/// Ended swarm jobs summed as they are added (a map's summary), keeping their summaries'
/// sums, not the jobs.
#[pyclass(frozen, name = "Totals", module = "corvid._corvid")]
#[derive(Default)]
struct PyTotals {
    /// Jobs added, tasks sent again, and the sum of their summaries.
    sum: Mutex<(usize, usize, corvid_node::JobSummary)>,
}

#[pymethods]
impl PyTotals {
    #[new]
    fn new() -> PyTotals {
        PyTotals::default()
    }

    /// Adds an ended job's summary; false if it has none (not a swarm job, or not ended).
    fn add(&self, handle: &PyJob) -> bool {
        let Some(job) = corvid_node::JobSummary::of_state(&handle.state) else {
            return false;
        };
        let mut sum = self.sum.lock().unwrap_or_else(|p| p.into_inner());
        let (jobs, again, total) = &mut *sum;
        let mut added = corvid_node::JobSummary::total([&*total, &job]);
        *again += std::mem::take(&mut added.redispatches).len();
        *jobs += 1;
        *total = added;
        true
    }

    /// (the summed table as text, per place `{"tasks", "bytes_in", "bytes_out",
    /// "failures"}`); places are peer ids or "requester".
    #[allow(clippy::type_complexity)]
    fn summary(
        &self,
    ) -> (
        String,
        std::collections::BTreeMap<String, std::collections::BTreeMap<&'static str, u64>>,
    ) {
        let sum = self.sum.lock().unwrap_or_else(|p| p.into_inner());
        let (jobs, again, total) = &*sum;
        let places = total
            .places
            .iter()
            .map(|(p, s)| {
                let name = match p {
                    corvid_sdk::sched::Place::Local => "requester".to_string(),
                    corvid_sdk::sched::Place::Peer(id) => id.clone(),
                };
                let v = std::collections::BTreeMap::from([
                    ("tasks", s.tasks as u64),
                    ("bytes_in", s.bytes_in),
                    ("bytes_out", s.bytes_out),
                    ("failures", s.failures as u64),
                    ("resent", s.resent),
                ]);
                (name, v)
            })
            .collect();
        (
            format!("{jobs} jobs ({again} tasks sent again); summed:\n{total}"),
            places,
        )
    }
}

/// The ops `Tensor` has by name: `{"unary": [...], "binary": [...], "reduce": [...]}`.
#[pyfunction]
fn ops() -> std::collections::BTreeMap<&'static str, Vec<&'static str>> {
    std::collections::BTreeMap::from([
        ("unary", UnaryOp::ALL.iter().map(|o| o.name()).collect()),
        ("binary", BinaryOp::ALL.iter().map(|o| o.name()).collect()),
        ("reduce", ReduceOp::ALL.iter().map(|o| o.name()).collect()),
    ])
}

/// Trains a `Model`: `loss(*batch, weights)` returns the mean loss over the rows it is given
/// (tensors of the step's graph; weights by name). Each `step` runs forward, backward and the
/// optimizer's update as one job; `shards=k` splits the batch into k gradient branches (data
/// parallel, summed in shard order: the same result wherever they ran).
#[pyclass(frozen, name = "Trainer", module = "corvid._corvid")]
struct PyTrainer {
    /// Held through a step (the GIL is not): another thread's step is refused, not waited
    /// for, since waiting with the GIL would deadlock the running step.
    trainer: Mutex<corvid_sdk::train::Trainer>,
    /// The parameters and step count as of the last step, for the getters.
    now: Mutex<(corvid_sdk::Model, u64)>,
}

#[pymethods]
impl PyTrainer {
    #[new]
    #[pyo3(signature = (loss, model, optimizer = "adam", lr = 1e-3, momentum = 0.0, shards = 1, name = "train"))]
    fn new(
        loss: Py<PyAny>,
        model: &PyModel,
        optimizer: &str,
        lr: f32,
        momentum: f32,
        shards: usize,
        name: &str,
    ) -> PyResult<PyTrainer> {
        use corvid_sdk::train::{Optimizer, Trainer};
        let optimizer = match optimizer {
            "sgd" => Optimizer::momentum(lr, momentum),
            "adam" => Optimizer::adam(lr),
            other => {
                return Err(CorvidError::new_err(format!(
                    "unknown optimizer '{other}': 'sgd' or 'adam'"
                )));
            }
        };
        let trainer = Trainer::new(
            name,
            model.m.clone(),
            optimizer,
            move |_, batch, weights| {
                Python::attach(|py| {
                    let call = || -> PyResult<Tensor> {
                        let args: Vec<Py<PyTensor>> = batch
                            .iter()
                            .map(|t| Py::new(py, PyTensor { t: t.clone() }))
                            .collect::<PyResult<_>>()?;
                        let w = pyo3::types::PyDict::new(py);
                        for (n, t) in weights {
                            w.set_item(n, Py::new(py, PyTensor { t: t.clone() })?)?;
                        }
                        let mut all: Vec<Bound<'_, PyAny>> = args
                            .into_iter()
                            .map(|a| a.into_bound(py).into_any())
                            .collect();
                        all.push(w.into_any());
                        let out = loss.call1(py, pyo3::types::PyTuple::new(py, all)?)?;
                        let t: PyRef<'_, PyTensor> = out.extract(py)?;
                        Ok(t.t.clone())
                    };
                    call().map_err(|e| corvid_sdk::BuildError::Data {
                        at: corvid_sdk::Site(std::panic::Location::caller()),
                        reason: format!("the loss function failed: {e}"),
                    })
                })
            },
        )
        .with_shards(shards);
        Ok(PyTrainer {
            now: Mutex::new((model.m.clone(), 0)),
            trainer: Mutex::new(trainer),
        })
    }

    /// One step over `batch` (arrays with the same number of rows) on `client`'s swarm (or
    /// this machine without one); returns the batch's mean loss before the update.
    #[pyo3(signature = (*batch, client = None))]
    fn step(
        &self,
        py: Python<'_>,
        batch: Vec<Bound<'_, PyAny>>,
        client: Option<&PyClient>,
    ) -> PyResult<f32> {
        let data: Vec<Data> = batch.iter().map(from_numpy).collect::<PyResult<_>>()?;
        let executor: Arc<dyn corvid_sdk::Executor> = match client {
            Some(c) => c.client.executor(),
            None => {
                let backend = corvid_kernels::Backend::open(corvid_kernels::BackendChoice::Cpu)
                    .map_err(|e| CorvidError::new_err(e.to_string()))?;
                Arc::new(LocalExecutor::new(backend))
            }
        };
        let mut trainer = match self.trainer.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(CorvidError::new_err(
                    "a step of this trainer is already running (steps run one at a time)",
                ));
            }
        };
        // Built here (the loss function is Python), run without the GIL.
        let (g, outs) = trainer.plan_step(&executor, &data).map_err(eval_err)?;
        let values = py
            .detach(move || g.eval(&outs.iter().collect::<Vec<_>>()))
            .map_err(eval_err)?;
        let step = trainer.finish_step(values).map_err(eval_err)?;
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) =
            (trainer.model().clone(), trainer.steps());
        Ok(step.loss)
    }

    /// The parameters as they are now.
    #[getter]
    fn model(&self) -> PyModel {
        PyModel {
            m: self.now.lock().unwrap_or_else(|p| p.into_inner()).0.clone(),
        }
    }

    #[getter]
    fn steps(&self) -> u64 {
        self.now.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

#[pymodule]
fn _corvid(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyClient>()?;
    m.add_class::<PyGraph>()?;
    m.add_class::<PyTensor>()?;
    m.add_class::<PyJob>()?;
    m.add_function(wrap_pyfunction!(wait_any, m)?)?;
    m.add_function(wrap_pyfunction!(ops, m)?)?;
    m.add_function(wrap_pyfunction!(save_npy, m)?)?;
    m.add_function(wrap_pyfunction!(save_safetensors, m)?)?;
    m.add_class::<PyTotals>()?;
    m.add_class::<PyModel>()?;
    m.add_class::<PyTrainer>()?;
    m.add("CorvidError", py.get_type::<CorvidError>())?;
    m.add("BuildError", py.get_type::<BuildError>())?;
    m.add("EvalError", py.get_type::<EvalError>())?;
    m.add("Cancelled", py.get_type::<Cancelled>())?;
    m.add("ClientError", py.get_type::<ClientError>())?;
    Ok(())
}
