//! A small DAG of ops that a backend runs in one go, keeping intermediates on its device.

use serde::{Deserialize, Serialize};

use crate::budget::{self, Budget, Footprint, TooLarge};
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
        budget::validate(self, budget)
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
}
