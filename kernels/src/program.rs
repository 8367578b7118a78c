//! A small DAG of ops that a backend runs in one go, keeping intermediates on its device.

use serde::{Deserialize, Serialize};

use crate::budget::{
    At, Budget, Footprint, Limit, TooLarge, VALUE_OVERHEAD, extent_bytes, workspace_bytes,
};
use crate::op::Op;
use crate::shape::{MAX_RANK, OpError, infer};
use crate::tensor::TensorMeta;

/// Index of a value in a [`Program`]: inputs first (`0..inputs.len()`), then one per node.
pub type ValueId = u32;

/// One op applied to earlier values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub args: Vec<ValueId>,
}

/// Most inputs, nodes or outputs a program may have on the wire. Far above any budget (see
/// [`crate::Budget::MAX_NODES`]); checked while decoding, before the lists are built, because a
/// node costs three encoded bytes but a hundred decoded ones.
pub const MAX_WIRE_ITEMS: usize = 1 << 16;

/// Ops in topological order over typed inputs, with chosen outputs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Program {
    #[serde(deserialize_with = "bounded")]
    pub inputs: Vec<TensorMeta>,
    #[serde(deserialize_with = "bounded")]
    pub nodes: Vec<Node>,
    #[serde(deserialize_with = "bounded")]
    pub outputs: Vec<ValueId>,
}

/// A list of at most [`MAX_WIRE_ITEMS`], refused on its declared length.
fn bounded<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_WIRE_ITEMS} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX_WIRE_ITEMS {
                return Err(serde::de::Error::invalid_length(hint, &self));
            }
            let mut v = Vec::with_capacity(hint.min(1024));
            while let Some(x) = seq.next_element()? {
                if v.len() == MAX_WIRE_ITEMS {
                    return Err(serde::de::Error::invalid_length(v.len() + 1, &self));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(Bounded(std::marker::PhantomData))
}

/// Why a program is malformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProgramError {
    #[error("node {node}: {source}")]
    Op {
        node: usize,
        #[source]
        source: OpError,
    },
    #[error("node {node} ('{op}') refers to value {arg}, which is not defined before it")]
    Dangling {
        node: usize,
        op: String,
        arg: ValueId,
    },
    #[error("output {index} refers to value {value}, but the program has {count} values")]
    Output {
        index: usize,
        value: ValueId,
        count: usize,
    },
    #[error("input {index} has rank {rank}, over the limit of {MAX_RANK}")]
    InputRank { index: usize, rank: usize },
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
}

impl Program {
    /// A program over the given inputs, with no nodes yet.
    pub fn new(inputs: Vec<TensorMeta>) -> Self {
        Program {
            inputs,
            ..Program::default()
        }
    }

    /// Appends a node and returns its value id.
    pub fn push(&mut self, op: Op, args: &[ValueId]) -> ValueId {
        self.nodes.push(Node {
            op,
            args: args.to_vec(),
        });
        (self.inputs.len() + self.nodes.len() - 1) as ValueId
    }

    /// A one-op program whose inputs are the op's arguments.
    pub fn single(op: Op, inputs: Vec<TensorMeta>) -> Self {
        let args: Vec<ValueId> = (0..inputs.len() as ValueId).collect();
        let mut p = Program::new(inputs);
        let out = p.push(op, &args);
        p.outputs.push(out);
        p
    }

    pub fn value_count(&self) -> usize {
        self.inputs.len() + self.nodes.len()
    }

    /// Checks every node and returns the meta of every value (inputs, then nodes).
    pub fn infer(&self) -> Result<Vec<TensorMeta>, ProgramError> {
        let mut metas: Vec<TensorMeta> = Vec::with_capacity(self.value_count());
        metas.extend_from_slice(&self.inputs);
        for (i, node) in self.nodes.iter().enumerate() {
            let mut args = Vec::with_capacity(node.args.len());
            for &a in &node.args {
                let m = metas
                    .get(a as usize)
                    .ok_or_else(|| ProgramError::Dangling {
                        node: i,
                        op: node.op.to_string(),
                        arg: a,
                    })?;
                args.push(m);
            }
            let out =
                infer(&node.op, &args).map_err(|source| ProgramError::Op { node: i, source })?;
            metas.push(out);
        }
        for (index, &value) in self.outputs.iter().enumerate() {
            if value as usize >= metas.len() {
                return Err(ProgramError::Output {
                    index,
                    value,
                    count: metas.len(),
                });
            }
        }
        Ok(metas)
    }

    /// Checks every node and every limit of `budget` before anything runs: what a backend
    /// does first with a program it did not build (see [`crate::budget`]). Linear in the
    /// program's size, never in the sizes it claims.
    pub fn validate(&self, budget: &Budget) -> Result<Footprint, ProgramError> {
        validate(self, budget)
    }

    /// For each value, the index of the last node that reads it: `usize::MAX` for outputs,
    /// the producing node itself for a node's value that nothing reads (it can go at once),
    /// and 0 for an input nothing reads.
    pub fn last_uses(&self) -> Vec<usize> {
        let n_in = self.inputs.len();
        let mut last: Vec<usize> = (0..self.value_count())
            .map(|v| v.saturating_sub(n_in))
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            for &a in &n.args {
                last[a as usize] = last[a as usize].max(i);
            }
        }
        for &o in &self.outputs {
            last[o as usize] = usize::MAX;
        }
        last
    }

    /// The part of the program that node `node` depends on: its ancestors and itself, in
    /// order, over the same inputs, with that node's value as the only output. Also returns
    /// which original node each kept node is. What a verifier runs to recompute one op.
    /// `None` if there is no such node, or an argument does not refer to an earlier value.
    pub fn cone(&self, node: usize) -> Option<(Program, Vec<usize>)> {
        let n_in = self.inputs.len();
        if node >= self.nodes.len() {
            return None;
        }
        let mut needed = vec![false; self.nodes.len()];
        needed[node] = true;
        for i in (0..=node).rev() {
            if needed[i] {
                for &a in &self.nodes[i].args {
                    if a as usize >= n_in + i {
                        return None;
                    }
                    if let Some(j) = (a as usize).checked_sub(n_in) {
                        needed[j] = true;
                    }
                }
            }
        }
        let kept: Vec<usize> = (0..=node).filter(|&i| needed[i]).collect();
        // Old value id -> new value id; inputs keep theirs.
        let mut map: Vec<ValueId> = (0..n_in as ValueId).collect();
        map.resize(n_in + self.nodes.len(), ValueId::MAX);
        let mut cone = Program::new(self.inputs.clone());
        for &i in &kept {
            let args: Vec<ValueId> = self.nodes[i]
                .args
                .iter()
                .map(|&a| map[a as usize])
                .collect();
            map[n_in + i] = cone.push(self.nodes[i].op.clone(), &args);
        }
        cone.outputs = vec![map[n_in + node]];
        Some((cone, kept))
    }

    /// Canonical bytes: the postcard encoding. Equal programs have equal bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("programs always serialise")
    }
}

/// See [`Program::validate`].
fn validate(program: &Program, budget: &Budget) -> Result<Footprint, ProgramError> {
    let over = |limit, at, value: u64, max: u64| -> Result<(), ProgramError> {
        if value > max {
            return Err(ProgramError::TooLarge(TooLarge {
                limit,
                at,
                value,
                max,
            }));
        }
        Ok(())
    };
    let nodes = program.nodes.len();
    over(Limit::Nodes, None, nodes as u64, budget.max_nodes as u64)?;
    // Bounded by the node count check above and the wire's head cap: encoding is cheap.
    let program_bytes = program.canonical_bytes().len() as u64;
    over(
        Limit::ProgramBytes,
        None,
        program_bytes,
        budget.max_program_bytes,
    )?;
    let n_in = program.inputs.len();
    let mut largest = 0u64;
    for (index, m) in program.inputs.iter().enumerate() {
        if m.rank() > MAX_RANK {
            return Err(ProgramError::InputRank {
                index,
                rank: m.rank(),
            });
        }
        let b = extent_bytes(m);
        let at = || {
            Some(At::Input {
                index,
                meta: m.clone(),
            })
        };
        over(Limit::TensorBytes, at(), b, budget.max_tensor_bytes)?;
        largest = largest.max(b);
    }
    let metas = program.infer()?;
    let last = program.last_uses();
    // Inputs are held by the caller for the whole run; the run's tables (metas, slots, the
    // encoded program) for all of it.
    let overhead = (metas.len() as u64)
        .saturating_mul(VALUE_OVERHEAD)
        .saturating_add(program_bytes.saturating_mul(2));
    let mut live = program
        .inputs
        .iter()
        .fold(overhead, |s, m| s.saturating_add(m.bytes()));
    let mut peak = live;
    let mut flops = 0u64;
    for (i, node) in program.nodes.iter().enumerate() {
        let out = &metas[n_in + i];
        let at = || {
            Some(At::Node {
                index: i,
                op: node.op.to_string(),
                meta: out.clone(),
            })
        };
        let b = extent_bytes(out);
        over(Limit::TensorBytes, at(), b, budget.max_tensor_bytes)?;
        largest = largest.max(b);
        let args: Vec<&TensorMeta> = node.args.iter().map(|&a| &metas[a as usize]).collect();
        flops = flops.saturating_add(node.op.flops(&args, out));
        over(Limit::Flops, at(), flops, budget.max_flops)?;
        let ws = workspace_bytes(&node.op, &args, out);
        peak = peak.max(live.saturating_add(out.bytes()).saturating_add(ws));
        over(Limit::PeakMemory, at(), peak, budget.max_peak_bytes)?;
        live = live.saturating_add(out.bytes());
        // What this node was the last to read is freed (once, however often it was read);
        // a value nobody reads is freed as soon as it is made.
        for (k, &a) in node.args.iter().enumerate() {
            let a = a as usize;
            if a >= n_in && last[a] == i && !node.args[..k].contains(&(a as u32)) {
                live = live.saturating_sub(metas[a].bytes());
            }
        }
        if last[n_in + i] == i {
            live = live.saturating_sub(out.bytes());
        }
    }
    Ok(Footprint {
        metas,
        nodes,
        program_bytes,
        largest_value: largest,
        peak_bytes: peak,
        flops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{BinaryOp, UnaryOp};

    #[test]
    fn decoding_refuses_more_nodes_than_the_wire_allows_before_building_them() {
        let mut p = Program::new(vec![TensorMeta::f32([1])]);
        for _ in 0..MAX_WIRE_ITEMS {
            p.push(Op::Unary(UnaryOp::Neg), &[0]);
        }
        let ok: Program = postcard::from_bytes(&p.canonical_bytes()).unwrap();
        assert_eq!(ok.nodes.len(), MAX_WIRE_ITEMS);
        p.push(Op::Unary(UnaryOp::Neg), &[0]);
        assert!(postcard::from_bytes::<Program>(&p.canonical_bytes()).is_err());
    }

    #[test]
    fn a_cone_keeps_only_the_ancestors_of_its_node() {
        let f = |s: &[usize]| TensorMeta::f32(s.to_vec());
        let mut p = Program::new(vec![f(&[2, 3]), f(&[3, 4]), f(&[4])]);
        let mm = p.push(Op::MatMul, &[0, 1]);
        let unrelated = p.push(Op::Unary(UnaryOp::Exp), &[0]);
        let add = p.push(Op::Binary(BinaryOp::Add), &[mm, 2]);
        let relu = p.push(Op::Unary(UnaryOp::Relu), &[add]);
        p.outputs = vec![relu, unrelated];

        let (cone, kept) = p.cone(2).expect("node 2 exists");
        assert_eq!(kept, vec![0, 2]);
        assert_eq!(cone.inputs, p.inputs);
        assert_eq!(cone.nodes[0], p.nodes[0]);
        assert_eq!(
            cone.nodes[1].args,
            vec![3, 2],
            "the add now reads the cone's matmul"
        );
        assert_eq!(cone.outputs, vec![4]);
        assert_eq!(cone.infer().expect("a valid program")[4], f(&[2, 4]));

        let (cone, kept) = p.cone(1).expect("node 1 exists");
        assert_eq!(
            (kept, cone.nodes.len(), cone.outputs),
            (vec![1], 1, vec![3])
        );
        assert!(p.cone(4).is_none());
    }

    fn f(shape: &[usize]) -> TensorMeta {
        TensorMeta::f32(shape.to_vec())
    }

    #[test]
    fn peak_frees_intermediates_after_their_last_use() {
        // x -> exp -> neg -> relu: one input (4 KiB) and at most two 4 KiB values at a time.
        let mut p = Program::new(vec![f(&[1024])]);
        let a = p.push(Op::Unary(UnaryOp::Exp), &[0]);
        let b = p.push(Op::Unary(UnaryOp::Neg), &[a]);
        let c = p.push(Op::Unary(UnaryOp::Relu), &[b]);
        p.outputs = vec![c];
        let fp = p.validate(&Budget::unlimited()).unwrap();
        let overhead = 4 * VALUE_OVERHEAD + 2 * fp.program_bytes;
        assert_eq!(fp.peak_bytes, 3 * 4096 + overhead);
        assert_eq!(fp.flops, 3 * 1024);
        // The same chain keeping everything (all outputs) holds four values.
        p.outputs = vec![a, b, c];
        let fp = p.validate(&Budget::unlimited()).unwrap();
        assert_eq!(
            fp.peak_bytes,
            4 * 4096 + 4 * VALUE_OVERHEAD + 2 * fp.program_bytes
        );
    }

    #[test]
    fn every_limit_names_where() {
        let mut p = Program::new(vec![f(&[1])]);
        let big = p.push(
            Op::BroadcastTo {
                shape: vec![1 << 20, 1 << 20],
            },
            &[0],
        );
        p.outputs = vec![big];
        let e = p
            .validate(&Budget::new(1 << 30, 1 << 30, 1 << 40))
            .unwrap_err();
        let ProgramError::TooLarge(t) = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (t.limit, t.value, t.max),
            (Limit::TensorBytes, 1 << 42, 1 << 30)
        );
        assert!(
            e.to_string().starts_with(
                "node 0 ('broadcast_to(shape=[1048576, 1048576])' making f32[1048576, 1048576])"
            ),
            "{e}"
        );

        // Empty axes count as 1: a [2^40, 0] input is refused although it holds nothing.
        let p = Program::single(Op::Unary(UnaryOp::Neg), vec![f(&[1 << 40, 0])]);
        let e = p
            .validate(&Budget::new(1 << 30, 1 << 30, 1 << 40))
            .unwrap_err();
        assert!(
            e.to_string().starts_with("input 0 (f32[1099511627776, 0])"),
            "{e}"
        );

        let p = Program::single(Op::MatMul, vec![f(&[512, 512]), f(&[512, 512])]);
        let e = p
            .validate(&Budget::new(1 << 30, 1 << 30, 1 << 20))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("the program needs 268435456 flops, over the limit of 1048576"),
            "{e}"
        );
        let e = p
            .validate(&Budget::new(1 << 30, 1 << 20, 1 << 40))
            .unwrap_err();
        assert!(e.to_string().contains("bytes of memory at once"), "{e}");

        let mut p = Program::new(vec![f(&[4])]);
        let mut v = 0;
        for _ in 0..5 {
            v = p.push(Op::Binary(BinaryOp::Add), &[v, 0]);
        }
        p.outputs = vec![v];
        let tight = Budget {
            max_nodes: 4,
            ..Budget::unlimited()
        };
        let e = p.validate(&tight).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the program has 5 nodes, over the limit of 4"
        );
    }
}
