//! Reverse-mode autodiff: the gradient of a scalar is built as more ops of the same graph, so a
//! backward pass is an ordinary graph that is partitioned, placed and verified like any other
//! (Freivalds checks the matmuls of the backward pass too).
//!
//! Every op's vector-Jacobian product is written with existing ops ([`vjp`]). Ops without a
//! useful derivative (comparisons, `argmax`, casts) refuse with [`BuildError::NoGradient`] when
//! a gradient has to flow through them; the condition of `select`/`where` gets none (its
//! gradient is zero wherever it is defined), so masks built from comparisons are fine.

use std::collections::HashMap;
use std::panic::Location;

use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_kernels::{DType, Op, TensorMeta};

use crate::error::{BuildError, Site};
use crate::graph::{Graph, NodeId, NodeKind};
use crate::tensor::Tensor;

type Built = Result<Tensor, BuildError>;

/// A node as the backward pass reads it: its op and arguments (none for a leaf), its meta.
type Seen = (Option<(Op, Vec<NodeId>)>, TensorMeta);

impl Graph {
    /// The gradients of the scalar `loss` with respect to each of `params` (f32 tensors of this
    /// graph: constants or anything computed), as tensors of this graph. A parameter the loss
    /// does not depend on gets zeros.
    ///
    /// ```
    /// use corvid_sdk::Graph;
    /// let g = Graph::new("grad");
    /// let x = g.t(&[1.0, 2.0, 3.0]);
    /// let loss = (&x * &x).sum(&[0], false)?;          // sum of squares
    /// let dx = &g.grad(&loss, &[&x])?[0];
    /// assert_eq!(dx.eval()?.as_slice().unwrap(), &[2.0, 4.0, 6.0]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[track_caller]
    pub fn grad(&self, loss: &Tensor, params: &[&Tensor]) -> Result<Vec<Tensor>, BuildError> {
        let at = Site(Location::caller());
        let b = Builder { g: self, at };
        for t in std::iter::once(loss).chain(params.iter().copied()) {
            if t.graph() != self {
                return Err(BuildError::MixedGraphs {
                    at,
                    op: "grad".into(),
                    a: self.name().into(),
                    b: t.graph().name().into(),
                });
            }
            t.check()?;
        }
        if loss.meta().numel() != 1 || loss.dtype() != DType::F32 {
            return Err(b.no_grad(
                "grad",
                format!(
                    "the loss must be one f32 value, it is {} (reduce it first, e.g. .mean(..))",
                    loss.meta()
                ),
            ));
        }
        for (i, p) in params.iter().enumerate() {
            if p.dtype() != DType::F32 {
                return Err(b.no_grad(
                    "grad",
                    format!(
                        "parameter {i} is {}: only f32 tensors have gradients",
                        p.meta()
                    ),
                ));
            }
        }
        // The nodes up to the loss (arguments come before their ops), copied out of the lock.
        let nodes: Vec<Seen> = {
            let inner = self.inner();
            inner.nodes[..=loss.node()]
                .iter()
                .map(|n| {
                    let op = match &n.kind {
                        NodeKind::Op { op, args } => Some((op.clone(), args.clone())),
                        _ => None,
                    };
                    (op, n.meta.clone())
                })
                .collect()
        };
        // Which nodes depend on a parameter: only their cotangents are needed.
        let mut depends = vec![false; nodes.len()];
        for p in params {
            if p.node() < nodes.len() {
                depends[p.node()] = true;
            }
        }
        for i in 0..nodes.len() {
            if let (Some((_, args)), false) = (&nodes[i].0, depends[i]) {
                depends[i] = args.iter().any(|&a| depends[a]);
            }
        }
        let tensor = |i: NodeId| Tensor::new(self.clone(), i, nodes[i].1.clone());
        let mut cot: HashMap<NodeId, Tensor> = HashMap::new();
        if depends[loss.node()] {
            let one = b.full(loss.shape(), 1.0)?;
            cot.insert(loss.node(), one);
        }
        for i in (0..nodes.len()).rev() {
            let Some((op, args)) = &nodes[i].0 else {
                continue; // a leaf: its cotangent stays for the parameters
            };
            let Some(g) = cot.remove(&i) else {
                continue;
            };
            // Kept for the parameters among the ops: a parameter may be computed.
            if params.iter().any(|p| p.node() == i) {
                cot.insert(i, g.clone());
            }
            let wanted: Vec<bool> = args.iter().map(|&a| depends[a]).collect();
            let ins: Vec<Tensor> = args.iter().map(|&a| tensor(a)).collect();
            let grads = vjp(&b, op, &ins, &tensor(i), &g, &wanted)?;
            for ((&a, grad), want) in args.iter().zip(grads).zip(wanted) {
                let Some(grad) = grad.filter(|_| want) else {
                    continue;
                };
                let sum = match cot.remove(&a) {
                    Some(before) => b.bin(BinaryOp::Add, &before, &grad)?,
                    None => grad,
                };
                cot.insert(a, sum);
            }
        }
        params
            .iter()
            .map(|p| match cot.get(&p.node()) {
                Some(g) => Ok(g.clone()),
                None => b.full(p.shape(), 0.0),
            })
            .collect()
    }
}

/// Builds backward ops, each recorded at the `grad` call.
struct Builder<'a> {
    g: &'a Graph,
    at: Site,
}

impl Builder<'_> {
    fn op(&self, op: Op, args: &[&Tensor]) -> Built {
        self.g.apply_at(op, args, self.at)
    }

    fn un(&self, u: UnaryOp, x: &Tensor) -> Built {
        self.op(Op::Unary(u), &[x])
    }

    fn bin(&self, o: BinaryOp, a: &Tensor, b: &Tensor) -> Built {
        self.op(Op::Binary(o), &[a, b])
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Built {
        self.bin(BinaryOp::Mul, a, b)
    }

    fn scalar(&self, v: f32) -> Tensor {
        self.g.scalar(v)
    }

    /// `v` broadcast to `shape` (one value sent, not a tensor of them).
    fn full(&self, shape: &[usize], v: f32) -> Built {
        let s = self.scalar(v);
        if shape.is_empty() {
            return Ok(s);
        }
        self.op(
            Op::BroadcastTo {
                shape: shape.to_vec(),
            },
            &[&s],
        )
    }

    fn no_grad(&self, op: &str, why: String) -> BuildError {
        BuildError::NoGradient {
            at: self.at,
            op: op.into(),
            why,
        }
    }

    fn sum(&self, x: &Tensor, axes: &[usize], keepdims: bool) -> Built {
        self.op(
            Op::Reduce {
                op: ReduceOp::Sum,
                axes: axes.to_vec(),
                keepdims,
            },
            &[x],
        )
    }

    fn mean(&self, x: &Tensor, axes: &[usize]) -> Built {
        self.op(
            Op::Reduce {
                op: ReduceOp::Mean,
                axes: axes.to_vec(),
                keepdims: true,
            },
            &[x],
        )
    }

    fn reshape(&self, x: &Tensor, shape: &[usize]) -> Built {
        if x.shape() == shape {
            return Ok(x.clone());
        }
        self.op(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
        )
    }

    fn permute(&self, x: &Tensor, axes: &[usize]) -> Built {
        self.op(
            Op::Permute {
                axes: axes.to_vec(),
            },
            &[x],
        )
    }

    fn pad(&self, x: &Tensor, pads: Vec<[usize; 2]>) -> Built {
        if pads.iter().all(|p| *p == [0, 0]) {
            return Ok(x.clone());
        }
        self.op(Op::Pad { pads, value: 0.0 }, &[x])
    }

    fn slice(&self, x: &Tensor, starts: Vec<usize>, ends: Vec<usize>, steps: Vec<usize>) -> Built {
        self.op(
            Op::Slice {
                starts,
                ends,
                steps,
            },
            &[x],
        )
    }

    /// Sums `t` (a broadcast result) down to `shape` (what was broadcast).
    fn sum_to(&self, t: &Tensor, shape: &[usize]) -> Built {
        let full = t.shape().to_vec();
        if full == shape {
            return Ok(t.clone());
        }
        let lead = full.len() - shape.len();
        let axes: Vec<usize> = (0..full.len())
            .filter(|&i| i < lead || (shape[i - lead] == 1 && full[i] != 1))
            .collect();
        let summed = if axes.is_empty() {
            t.clone()
        } else {
            self.sum(t, &axes, true)?
        };
        self.reshape(&summed, shape)
    }

    /// The last two axes swapped.
    fn transpose(&self, x: &Tensor) -> Built {
        let r = x.shape().len();
        let mut axes: Vec<usize> = (0..r).collect();
        axes.swap(r - 2, r - 1);
        self.permute(x, &axes)
    }

    /// `g` (the result of slicing `in_shape` by `starts`/`ends`/`steps`) put back where it came
    /// from, zeros elsewhere: strided axes get zeros interleaved, then every axis is padded.
    fn unslice(&self, g: &Tensor, in_shape: &[usize], starts: &[usize], steps: &[usize]) -> Built {
        let mut g = g.clone();
        for (axis, &step) in steps.iter().enumerate() {
            if step > 1 && g.shape()[axis] > 1 {
                g = self.interleave(&g, axis, step)?;
            }
        }
        let pads = (0..in_shape.len())
            .map(|i| [starts[i], in_shape[i] - starts[i] - g.shape()[i]])
            .collect();
        self.pad(&g, pads)
    }

    /// `step - 1` zeros after each element along `axis` but the last.
    fn interleave(&self, g: &Tensor, axis: usize, step: usize) -> Built {
        let shape = g.shape().to_vec();
        let n = shape[axis];
        let mut split = shape.clone();
        split.insert(axis + 1, 1);
        let x = self.reshape(g, &split)?;
        let mut pads = vec![[0, 0]; split.len()];
        pads[axis + 1] = [0, step - 1];
        let x = self.pad(&x, pads)?;
        let mut joined = shape.clone();
        joined[axis] = n * step;
        let x = self.reshape(&x, &joined)?;
        let mut ends = joined.clone();
        ends[axis] = (n - 1) * step + 1;
        self.slice(&x, vec![0; joined.len()], ends, vec![1; joined.len()])
    }

    /// `x` reversed along `axis` (slices of one, joined in reverse).
    fn flip(&self, x: &Tensor, axis: usize) -> Built {
        let shape = x.shape().to_vec();
        let r = shape.len();
        let parts: Vec<Tensor> = (0..shape[axis])
            .rev()
            .map(|i| {
                let mut starts = vec![0; r];
                let mut ends = shape.clone();
                starts[axis] = i;
                ends[axis] = i + 1;
                self.slice(x, starts, ends, vec![1; r])
            })
            .collect::<Result<_, _>>()?;
        let refs: Vec<&Tensor> = parts.iter().collect();
        self.op(Op::Concat { axis }, &refs)
    }

    /// 0/1 where `cmp(a, b)` holds.
    fn mask(&self, cmp: BinaryOp, a: &Tensor, b: &Tensor) -> Built {
        self.bin(cmp, a, b)
    }
}

/// The vector-Jacobian product of `op` at inputs `x` (output `y`, cotangent `g`): a gradient
/// per input, `None` for inputs that get none (or are not `wanted`).
fn vjp(
    b: &Builder<'_>,
    op: &Op,
    x: &[Tensor],
    y: &Tensor,
    g: &Tensor,
    wanted: &[bool],
) -> Result<Vec<Option<Tensor>>, BuildError> {
    use BinaryOp as B;
    use UnaryOp as U;
    let one = |t: Built| t.map(|t| vec![Some(t)]);
    match op {
        Op::Unary(u) => {
            let x0 = &x[0];
            let d = match u {
                U::Neg => return one(b.un(U::Neg, g)),
                U::Abs => {
                    let zero = b.scalar(0.0);
                    let sign = b.bin(
                        B::Sub,
                        &b.mask(B::Gt, x0, &zero)?,
                        &b.mask(B::Lt, x0, &zero)?,
                    )?;
                    return one(b.mul(g, &sign));
                }
                U::Exp => y.clone(),
                U::Log => return one(b.bin(B::Div, g, x0)),
                // 0.5 / sqrt(x)
                U::Sqrt => return one(b.bin(B::Div, &b.mul(g, &b.scalar(0.5))?, y)),
                // -0.5 x^-1.5 = -0.5 y^3
                U::Rsqrt => b.mul(&b.mul(&b.un(U::Square, y)?, y)?, &b.scalar(-0.5))?,
                U::Square => b.mul(x0, &b.scalar(2.0))?,
                // -1/x^2 = -y^2
                U::Reciprocal => b.un(U::Neg, &b.un(U::Square, y)?)?,
                U::Sin => b.un(U::Cos, x0)?,
                U::Cos => b.un(U::Neg, &b.un(U::Sin, x0)?)?,
                U::Tanh => b.bin(B::Sub, &b.scalar(1.0), &b.un(U::Square, y)?)?,
                U::Sigmoid => b.mul(y, &b.bin(B::Sub, &b.scalar(1.0), y)?)?,
                U::Relu => b.mask(B::Gt, x0, &b.scalar(0.0))?,
                U::Gelu => {
                    // y = 0.5 x (1 + tanh(c (x + a x^3))):
                    // y' = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
                    let (c, a) = (0.797_884_6, 0.044_715);
                    let x2 = b.un(U::Square, x0)?;
                    let inner = b.mul(
                        &b.bin(B::Add, x0, &b.mul(&b.mul(&x2, x0)?, &b.scalar(a))?)?,
                        &b.scalar(c),
                    )?;
                    let t = b.un(U::Tanh, &inner)?;
                    let left = b.mul(&b.bin(B::Add, &b.scalar(1.0), &t)?, &b.scalar(0.5))?;
                    let sech2 = b.bin(B::Sub, &b.scalar(1.0), &b.un(U::Square, &t)?)?;
                    let du = b.mul(
                        &b.bin(B::Add, &b.scalar(1.0), &b.mul(&x2, &b.scalar(3.0 * a))?)?,
                        &b.scalar(0.5 * c),
                    )?;
                    let right = b.mul(&b.mul(x0, &sech2)?, &du)?;
                    b.bin(B::Add, &left, &right)?
                }
                U::Softplus => b.un(U::Sigmoid, x0)?,
            };
            one(b.mul(g, &d))
        }
        Op::Clamp { min, max } => {
            let inside = b.mul(
                &b.mask(B::Ge, &x[0], &b.scalar(*min))?,
                &b.mask(B::Le, &x[0], &b.scalar(*max))?,
            )?;
            one(b.mul(g, &inside))
        }
        Op::Binary(o) => {
            let (l, r) = (&x[0], &x[1]);
            let (gl, gr) = match o {
                B::Add => (Some(g.clone()), Some(g.clone())),
                B::Sub => (Some(g.clone()), Some(b.un(U::Neg, g)?)),
                B::Mul => (
                    wanted[0].then(|| b.mul(g, r)).transpose()?,
                    wanted[1].then(|| b.mul(g, l)).transpose()?,
                ),
                B::Div => (
                    wanted[0].then(|| b.bin(B::Div, g, r)).transpose()?,
                    wanted[1]
                        .then(|| b.un(U::Neg, &b.bin(B::Div, &b.mul(g, y)?, r)?))
                        .transpose()?,
                ),
                B::Pow => (
                    wanted[0]
                        .then(|| {
                            let e = b.bin(B::Sub, r, &b.scalar(1.0))?;
                            b.mul(&b.mul(g, r)?, &b.bin(B::Pow, l, &e)?)
                        })
                        .transpose()?,
                    wanted[1]
                        .then(|| b.mul(&b.mul(g, y)?, &b.un(U::Log, l)?))
                        .transpose()?,
                ),
                // The larger (smaller) one takes the gradient; a tie goes to the left.
                B::Maximum | B::Minimum => {
                    let (keep_l, keep_r) = if *o == B::Maximum {
                        (B::Ge, B::Lt)
                    } else {
                        (B::Le, B::Gt)
                    };
                    (
                        Some(b.mul(g, &b.mask(keep_l, l, r)?)?),
                        Some(b.mul(g, &b.mask(keep_r, l, r)?)?),
                    )
                }
                B::Eq | B::Ne | B::Lt | B::Le | B::Gt | B::Ge => {
                    return Err(b.no_grad(
                        o.name(),
                        "a comparison has no useful derivative (its gradient is zero wherever it \
                         is defined); use it as the condition of select/where, which passes the \
                         gradient to the values it picks"
                            .into(),
                    ));
                }
            };
            let gl = gl.map(|t| b.sum_to(&t, l.shape())).transpose()?;
            let gr = gr.map(|t| b.sum_to(&t, r.shape())).transpose()?;
            Ok(vec![gl, gr])
        }
        Op::Where => {
            let zero = b.scalar(0.0);
            let ga = wanted[1]
                .then(|| b.sum_to(&b.op(Op::Where, &[&x[0], g, &zero])?, x[1].shape()))
                .transpose()?;
            let gb = wanted[2]
                .then(|| b.sum_to(&b.op(Op::Where, &[&x[0], &zero, g])?, x[2].shape()))
                .transpose()?;
            Ok(vec![None, ga, gb])
        }
        Op::Cast { to } => Err(b.no_grad(
            "cast",
            format!("a cast to {to} has no useful derivative; keep the parameters' path in f32"),
        )),
        Op::ArgMax { .. } => Err(b.no_grad(
            "argmax",
            "argmax has no derivative (an index); a loss over softmax or log_softmax has one"
                .into(),
        )),
        Op::MatMul => {
            let (l, r) = (&x[0], &x[1]);
            let gl = wanted[0]
                .then(|| b.sum_to(&b.op(Op::MatMul, &[g, &b.transpose(r)?])?, l.shape()))
                .transpose()?;
            let gr = wanted[1]
                .then(|| b.sum_to(&b.op(Op::MatMul, &[&b.transpose(l)?, g])?, r.shape()))
                .transpose()?;
            Ok(vec![gl, gr])
        }
        Op::Permute { axes } => {
            let mut inverse = vec![0; axes.len()];
            for (i, &a) in axes.iter().enumerate() {
                inverse[a] = i;
            }
            one(b.permute(g, &inverse))
        }
        Op::Reshape { .. } => one(b.reshape(g, x[0].shape())),
        Op::BroadcastTo { .. } => one(b.sum_to(g, x[0].shape())),
        Op::Slice { starts, steps, .. } => one(b.unslice(g, x[0].shape(), starts, steps)),
        Op::Concat { axis } => {
            let mut at = 0;
            let mut out = Vec::with_capacity(x.len());
            for (xi, want) in x.iter().zip(wanted) {
                let n = xi.shape()[*axis];
                if *want {
                    let r = g.shape().len();
                    let mut starts = vec![0; r];
                    let mut ends = g.shape().to_vec();
                    starts[*axis] = at;
                    ends[*axis] = at + n;
                    out.push(Some(b.slice(g, starts, ends, vec![1; r])?));
                } else {
                    out.push(None);
                }
                at += n;
            }
            Ok(out)
        }
        Op::Pad { pads, .. } => {
            let starts: Vec<usize> = pads.iter().map(|p| p[0]).collect();
            let ends: Vec<usize> = starts
                .iter()
                .zip(x[0].shape())
                .map(|(s, n)| s + n)
                .collect();
            let r = starts.len();
            one(b.slice(g, starts, ends, vec![1; r]))
        }
        Op::Reduce { op, axes, keepdims } => {
            let shape = x[0].shape();
            let kept: Vec<usize> = (0..shape.len())
                .map(|i| if axes.contains(&i) { 1 } else { shape[i] })
                .collect();
            let gk = if *keepdims {
                g.clone()
            } else {
                b.reshape(g, &kept)?
            };
            let count: usize = axes.iter().map(|&a| shape[a]).product();
            let spread = |t: &Tensor| {
                b.op(
                    Op::BroadcastTo {
                        shape: shape.to_vec(),
                    },
                    &[t],
                )
            };
            match op {
                ReduceOp::Sum => one(spread(&gk)),
                ReduceOp::Mean => one(spread(&b.mul(&gk, &b.scalar(1.0 / count as f32))?)),
                ReduceOp::Max | ReduceOp::Min => {
                    // Ties share the gradient equally.
                    let yk = b.reshape(y, &kept)?;
                    let hit = b.mask(B::Eq, &x[0], &yk)?;
                    let ties = b.sum(&hit, axes, true)?;
                    one(b.mul(&hit, &b.bin(B::Div, &gk, &ties)?))
                }
                ReduceOp::Variance => {
                    // d/dx mean((x - m)^2) = 2 (x - m) / n
                    let m = b.mean(&x[0], axes)?;
                    let centred = b.bin(B::Sub, &x[0], &m)?;
                    let scale = b.mul(&gk, &b.scalar(2.0 / count as f32))?;
                    one(b.mul(&centred, &scale))
                }
            }
        }
        Op::Softmax { axis } => {
            let dot = b.sum(&b.mul(g, y)?, &[*axis], true)?;
            one(b.mul(y, &b.bin(B::Sub, g, &dot)?))
        }
        Op::LogSoftmax { axis } => {
            let total = b.sum(g, &[*axis], true)?;
            let p = b.un(U::Exp, y)?;
            one(b.bin(B::Sub, g, &b.mul(&p, &total)?))
        }
        Op::LayerNorm { eps } => {
            let (xs, gamma) = (&x[0], &x[1]);
            let last = xs.shape().len() - 1;
            let mu = b.mean(xs, &[last])?;
            let centred = b.bin(B::Sub, xs, &mu)?;
            let var = b.mean(&b.un(U::Square, &centred)?, &[last])?;
            let rstd = b.un(U::Rsqrt, &b.bin(B::Add, &var, &b.scalar(*eps))?)?;
            let xhat = b.mul(&centred, &rstd)?;
            let dx = wanted[0]
                .then(|| {
                    let gx = b.mul(g, gamma)?;
                    let a = b.mean(&gx, &[last])?;
                    let c = b.mul(&xhat, &b.mean(&b.mul(&gx, &xhat)?, &[last])?)?;
                    b.mul(&rstd, &b.bin(B::Sub, &b.bin(B::Sub, &gx, &a)?, &c)?)
                })
                .transpose()?;
            let dgamma = wanted[1]
                .then(|| b.sum_to(&b.mul(g, &xhat)?, gamma.shape()))
                .transpose()?;
            let dbeta = wanted[2].then(|| b.sum_to(g, x[2].shape())).transpose()?;
            Ok(vec![dx, dgamma, dbeta])
        }
        Op::Conv2d { stride, padding } => conv2d_vjp(b, &x[0], &x[1], g, *stride, *padding, wanted),
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => one(max_pool2d_vjp(b, &x[0], y, g, *kernel, *stride, *padding)),
    }
}

/// `x [n, c, H, W]`, `w [o, c, kh, kw]`, `g [n, o, Ho, Wo]`.
fn conv2d_vjp(
    b: &Builder<'_>,
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    stride: [usize; 2],
    padding: [usize; 2],
    wanted: &[bool],
) -> Result<Vec<Option<Tensor>>, BuildError> {
    let (xs, ws) = (x.shape().to_vec(), w.shape().to_vec());
    let (kh, kw) = (ws[2], ws[3]);
    // The cotangent with stride - 1 zeros between its elements: a stride-1 convolution's.
    let mut gd = g.clone();
    for (axis, s) in [(2, stride[0]), (3, stride[1])] {
        if s > 1 && gd.shape()[axis] > 1 {
            gd = b.interleave(&gd, axis, s)?;
        }
    }
    let dx = wanted[0]
        .then(|| {
            // Full correlation with the flipped kernel, channels swapped, then cropped to the
            // padded input and unpadded.
            let wf = b.flip(&b.flip(w, 2)?, 3)?;
            let wt = b.permute(&wf, &[1, 0, 2, 3])?;
            let full = b.op(
                Op::Conv2d {
                    stride: [1, 1],
                    padding: [kh - 1, kw - 1],
                },
                &[&gd, &wt],
            )?;
            let fs = full.shape().to_vec();
            let (hp, wp) = (xs[2] + 2 * padding[0], xs[3] + 2 * padding[1]);
            let padded = b.pad(
                &full,
                vec![
                    [0, 0],
                    [0, 0],
                    [0, hp.saturating_sub(fs[2])],
                    [0, wp.saturating_sub(fs[3])],
                ],
            )?;
            b.slice(
                &padded,
                vec![0, 0, padding[0], padding[1]],
                vec![xs[0], xs[1], padding[0] + xs[2], padding[1] + xs[3]],
                vec![1; 4],
            )
        })
        .transpose()?;
    let dw = wanted[1]
        .then(|| {
            // dw[o, c, i, j] = sum over n, y, x of g[n, o, y, x] xpad[n, c, y s + i, x s + j]:
            // a convolution of x (channels as the batch) by the dilated cotangent.
            let xt = b.permute(x, &[1, 0, 2, 3])?;
            let gt = b.permute(&gd, &[1, 0, 2, 3])?;
            let c = b.op(
                Op::Conv2d {
                    stride: [1, 1],
                    padding,
                },
                &[&xt, &gt],
            )?;
            let cs = c.shape().to_vec();
            let cut = b.slice(&c, vec![0; 4], vec![cs[0], cs[1], kh, kw], vec![1; 4])?;
            b.permute(&cut, &[1, 0, 2, 3])
        })
        .transpose()?;
    Ok(vec![dx, dw])
}

/// Each window's gradient goes to its first maximum (padded positions never win), as the
/// reference picks it.
fn max_pool2d_vjp(
    b: &Builder<'_>,
    x: &Tensor,
    y: &Tensor,
    g: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Built {
    use BinaryOp as B;
    let xs = x.shape().to_vec();
    let ys = y.shape().to_vec();
    let padded = b.op(
        Op::Pad {
            pads: vec![[0, 0], [0, 0], [padding[0]; 2], [padding[1]; 2]],
            value: f32::MIN,
        },
        &[x],
    )?;
    let ps = padded.shape().to_vec();
    let mut taken: Option<Tensor> = None;
    let mut total: Option<Tensor> = None;
    for i in 0..kernel[0] {
        for j in 0..kernel[1] {
            let starts = vec![0, 0, i, j];
            let ends = vec![
                ys[0],
                ys[1],
                i + (ys[2] - 1) * stride[0] + 1,
                j + (ys[3] - 1) * stride[1] + 1,
            ];
            let steps = vec![1, 1, stride[0], stride[1]];
            let cand = b.slice(&padded, starts.clone(), ends, steps.clone())?;
            let mut hit = b.mask(B::Eq, &cand, y)?;
            if let Some(t) = &taken {
                hit = b.mul(&hit, &b.bin(B::Sub, &b.scalar(1.0), t)?)?;
            }
            taken = Some(match taken {
                Some(t) => b.bin(B::Add, &t, &hit)?,
                None => hit.clone(),
            });
            let back = b.unslice(&b.mul(g, &hit)?, &ps, &starts, &steps)?;
            total = Some(match total {
                Some(t) => b.bin(B::Add, &t, &back)?,
                None => back,
            });
        }
    }
    let total = total.expect("a kernel has at least one position");
    b.slice(
        &total,
        vec![0, 0, padding[0], padding[1]],
        vec![xs[0], xs[1], padding[0] + xs[2], padding[1] + xs[3]],
        vec![1; 4],
    )
}
