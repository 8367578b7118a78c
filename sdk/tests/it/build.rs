//! Building graphs: leaves from every source, a method for every op, clear errors at the line
//! that built the bad tensor, and ids that are the same in every process.

#![allow(clippy::unwrap_used)]

use corvid_kernels::op::{BinaryOp, ReduceOp, UnaryOp};
use corvid_kernels::{DType, Op, Tensor as Data, reference, registry};
use corvid_sdk::{BuildError, EvalError, Graph, Tensor};
use ndarray::array;

#[test]
fn ravop_quickstart() {
    let g = Graph::new("test");
    let a = g.t(&[1.0, 2.0, 3.0]);
    let b = g.t(&[5.0, 22.0, 7.0]);
    let c = &a + &b;
    assert_eq!(c.eval().unwrap().as_slice().unwrap(), &[6.0, 24.0, 10.0]);
    let d = (&c * 2.0 - 1.0) / &b;
    let want: Vec<f32> = [6.0f32, 24.0, 10.0]
        .iter()
        .zip([5.0f32, 22.0, 7.0])
        .map(|(c, b)| (c * 2.0 - 1.0) / b)
        .collect();
    assert_eq!(d.eval().unwrap().as_slice().unwrap(), want.as_slice());
    assert_eq!(
        (-&a).eval().unwrap().as_slice().unwrap(),
        &[-1.0, -2.0, -3.0]
    );
    assert!(g.end().is_ok());
}

#[test]
fn leaves_from_every_source() {
    let g = Graph::new("leaves");
    let v = g.from_vec(&[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    let a = g.from_array(array![[1.0f32, 2.0], [3.0, 4.0]]);
    assert_eq!(v.id(), a.id(), "same content, same id");
    let s = g.scalar(10.0);
    let r1 = g.random(&[3, 5], -1.0, 1.0, 42);
    let r2 = g.random(&[3, 5], -1.0, 1.0, 42);
    assert_eq!(r1.id(), r2.id());
    assert_eq!(r1.eval().unwrap(), r2.eval().unwrap());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    ndarray_npy::write_npy(&path, &array![[1.5f32, -2.0, 3.0]]).unwrap();
    let x = g.load_npy(&path).unwrap();
    assert_eq!(x.shape(), &[1, 3]);
    let y = (&x + &s).eval().unwrap();
    assert_eq!(y.as_slice().unwrap(), &[11.5, 8.0, 13.0]);

    let ipath = dir.path().join("i.npy");
    ndarray_npy::write_npy(&ipath, &array![7i32, -1]).unwrap();
    let i = g.load_npy(&ipath).unwrap();
    assert_eq!(i.dtype(), DType::I32);
    assert_eq!(i.eval_i32().unwrap().as_slice().unwrap(), &[7, -1]);

    let e = g.load_npy(dir.path().join("missing.npy")).unwrap_err();
    assert!(matches!(e, BuildError::File { .. }), "{e}");
    assert!(
        e.to_string().contains("missing.npy") && e.to_string().contains("build.rs"),
        "{e}"
    );

    let fpath = dir.path().join("f64.npy");
    ndarray_npy::write_npy(&fpath, &array![1.0f64, 2.0]).unwrap();
    let e = g.load_npy(&fpath).unwrap_err();
    assert!(e.to_string().contains("f32 and i32"), "{e}");

    let e = g.from_vec(&[2, 3], vec![1.0; 5]).unwrap_err();
    assert!(
        e.to_string()
            .contains("shape [2, 3] holds 6 elements but 5 were given"),
        "{e}"
    );
}

#[test]
fn bad_ops_fail_at_the_line_that_built_them() {
    let g = Graph::new("bad");
    let a = g.random(&[2, 3], -1.0, 1.0, 1);
    let b = g.random(&[4, 5], -1.0, 1.0, 2);
    let line = line!() + 1;
    let e = a.matmul(&b).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&format!("build.rs:{line}:")), "{msg}");
    assert!(
        msg.contains("op 'matmul': inner dimensions differ: 3 vs 4 (inputs f32[2, 3], f32[4, 5])"),
        "{msg}"
    );

    // Operators record the failure; eval and end() report it with the operator's line.
    let line = line!() + 1;
    let c = &a + &b;
    assert!(c.check().is_err());
    let d = c.relu();
    assert!(matches!(d, Err(BuildError::FailedInput { .. })), "{d:?}");
    let e = c.eval().unwrap_err();
    assert!(matches!(e, EvalError::Build { .. }), "{e}");
    assert!(e.to_string().contains(&format!("build.rs:{line}:")), "{e}");
    let report = g.end().unwrap_err();
    assert_eq!(report.failures.len(), 1, "{report}");
    assert!(
        report
            .to_string()
            .contains("op 'add': shapes do not broadcast (inputs f32[2, 3], f32[4, 5])"),
        "{report}"
    );

    // Wrong dtype and tensors of another graph.
    let idx = a.argmax(1, false).unwrap();
    let e = idx.exp().unwrap_err();
    assert!(
        e.to_string()
            .contains("op 'exp' expects input 0 to be f32, got i32[2]"),
        "{e}"
    );
    let other = Graph::new("other").t(&[1.0]);
    let e = a.add(&other).unwrap_err();
    assert!(
        e.to_string()
            .contains("mixes tensors of graphs 'bad' and 'other'"),
        "{e}"
    );
    assert!(
        idx.eval().is_err(),
        "evaluating an i32 tensor as f32 is an error"
    );
}

#[test]
fn identical_computations_are_one_node_and_outputs_share_work() {
    let g = Graph::new("cse");
    let x = g.random(&[8, 8], -1.0, 1.0, 3);
    let w = g.random(&[8, 8], -1.0, 1.0, 4);
    let h1 = x.matmul(&w).unwrap().relu().unwrap();
    let h2 = x.matmul(&w).unwrap().relu().unwrap();
    assert_eq!(h1.id(), h2.id());
    assert_eq!(g.len(), 4, "x, w, matmul and relu");
    let s = h1.sum(&[1], false).unwrap();
    let m = h2.mean(&[0, 1], false).unwrap();
    let plan = g.plan(&[&s, &m]).unwrap();
    let matmuls: usize = plan
        .subgraphs
        .iter()
        .map(|sg| sg.ops().matches("matmul").count())
        .sum();
    assert_eq!(matmuls, 1, "{}", plan.describe());
    let out = g.eval(&[&s, &m]).unwrap();
    assert_eq!(out.len(), 2);
}

/// Calls the SDK's named method for `op`: the match is exhaustive, so a new op without a
/// method does not compile here.
fn call(g: &Graph, op: &Op, args: &[Tensor]) -> Result<Tensor, BuildError> {
    let a = &args[0];
    match op {
        Op::Unary(u) => match u {
            UnaryOp::Neg => a.neg(),
            UnaryOp::Abs => a.abs(),
            UnaryOp::Exp => a.exp(),
            UnaryOp::Log => a.log(),
            UnaryOp::Sqrt => a.sqrt(),
            UnaryOp::Rsqrt => a.rsqrt(),
            UnaryOp::Square => a.square(),
            UnaryOp::Reciprocal => a.reciprocal(),
            UnaryOp::Sin => a.sin(),
            UnaryOp::Cos => a.cos(),
            UnaryOp::Tanh => a.tanh(),
            UnaryOp::Sigmoid => a.sigmoid(),
            UnaryOp::Relu => a.relu(),
            UnaryOp::Gelu => a.gelu(),
            UnaryOp::Softplus => a.softplus(),
        },
        Op::Binary(b) => {
            let o = &args[1];
            match b {
                BinaryOp::Add => a.add(o),
                BinaryOp::Sub => a.sub(o),
                BinaryOp::Mul => a.mul(o),
                BinaryOp::Div => a.div(o),
                BinaryOp::Pow => a.pow(o),
                BinaryOp::Maximum => a.maximum(o),
                BinaryOp::Minimum => a.minimum(o),
                BinaryOp::Eq => a.eq(o),
                BinaryOp::Ne => a.ne(o),
                BinaryOp::Lt => a.lt(o),
                BinaryOp::Le => a.le(o),
                BinaryOp::Gt => a.gt(o),
                BinaryOp::Ge => a.ge(o),
            }
        }
        Op::Clamp { min, max } => a.clamp(*min, *max),
        Op::Where => a.select(&args[1], &args[2]),
        Op::Cast { to } => a.cast(*to),
        Op::MatMul => a.matmul(&args[1]),
        Op::Permute { axes } => a.permute(axes),
        Op::Reshape { shape } => a.reshape(shape),
        Op::BroadcastTo { shape } => a.broadcast_to(shape),
        Op::Slice {
            starts,
            ends,
            steps,
        } => {
            let r: Vec<_> = (0..starts.len())
                .map(|i| (starts[i], ends[i], steps[i]))
                .collect();
            a.slice(&r)
        }
        Op::Concat { axis } => g.concat(&args.iter().collect::<Vec<_>>(), *axis),
        Op::Pad { pads, value } => a.pad(pads, *value),
        Op::Reduce { op, axes, keepdims } => match op {
            ReduceOp::Sum => a.sum(axes, *keepdims),
            ReduceOp::Mean => a.mean(axes, *keepdims),
            ReduceOp::Max => a.max(axes, *keepdims),
            ReduceOp::Min => a.min(axes, *keepdims),
            ReduceOp::Variance => a.variance(axes, *keepdims),
        },
        Op::ArgMax { axis, keepdims } => a.argmax(*axis, *keepdims),
        Op::Softmax { axis } => a.softmax(*axis),
        Op::LogSoftmax { axis } => a.log_softmax(*axis),
        Op::LayerNorm { eps } => a.layer_norm(&args[1], &args[2], *eps),
        Op::Conv2d { stride, padding } => a.conv2d(&args[1], *stride, *padding),
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
        } => a.max_pool2d(*kernel, *stride, *padding),
    }
}

#[test]
fn every_registry_op_has_a_method() {
    for spec in registry() {
        for seed in 0..3 {
            let s = spec.sample(seed);
            let g = Graph::new(spec.name);
            let args: Vec<Tensor> = s.inputs.iter().map(|t| g.constant(t.clone())).collect();
            let t = call(&g, &s.op, &args).unwrap_or_else(|e| panic!("{}: {e}", s.op));
            let got = t.eval_data().unwrap();
            let refs: Vec<&Data> = s.inputs.iter().collect();
            let want = reference::eval(&s.op, &refs).unwrap();
            assert_eq!(got.meta(), want.meta(), "{}", s.op);
        }
    }
}

/// A fixed graph, built the same way in the parent and the child process.
fn fixed_graph() -> (Graph, Tensor) {
    let g = Graph::new("ids");
    let x = g.random(&[70, 33], -1.0, 1.0, 5);
    let w = g.random(&[33, 40], -1.0, 1.0, 6);
    let b = g.t(&[0.5; 40]);
    let y = (x.matmul(&w).unwrap() + &b).softmax(1).unwrap();
    (g, y)
}

fn ids_line() -> String {
    let (g, y) = fixed_graph();
    let plan = g.plan(&[&y]).unwrap();
    let sg: Vec<String> = plan.subgraphs.iter().map(|s| s.id.to_string()).collect();
    format!(
        "graph={} value={} subgraphs={}",
        g.id(),
        y.id(),
        sg.join(",")
    )
}

#[test]
fn ids_are_stable_across_processes() {
    if std::env::var("CORVID_IDS_CHILD").is_ok() {
        println!("IDS {}", ids_line());
        return;
    }
    // This test's own name, wherever its module sits in the test binary.
    let name = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::ids_are_stable_across_processes"),
        None => "ids_are_stable_across_processes".to_string(),
    };
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name.as_str(), "--nocapture", "--test-threads=1"])
        .env("CORVID_IDS_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let child = stdout
        .lines()
        .find_map(|l| l.split_once("IDS ").map(|(_, ids)| ids))
        .unwrap_or_else(|| panic!("child printed no ids: {stdout}"));
    assert_eq!(child, ids_line());
    assert_eq!(ids_line(), ids_line());
}
