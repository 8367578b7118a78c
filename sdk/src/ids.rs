//! Content-addressed ids for values and subgraphs.
//!
//! A value's id is the content id of its data for a leaf, and otherwise blake3 over the op
//! (postcard) and its arguments' ids: the same computation has the same id on every machine,
//! in every run, however the graph was built.

use std::fmt;

use corvid_kernels::{ContentId, Op};
use serde::{Deserialize, Serialize};

macro_rules! hash_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The first 12 hex digits, for logs and tables.
            pub fn short(&self) -> String {
                self.to_string()[..12].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
    };
}

hash_id!(
    /// Identifies a value: a leaf's content, or the computation that produces it.
    ValueId
);
hash_id!(
    /// Identifies a subgraph: its canonical program and its inputs' value ids.
    SubgraphId
);

impl From<ContentId> for ValueId {
    fn from(c: ContentId) -> Self {
        ValueId(c.0)
    }
}

/// The id of `op` applied to values with ids `args`.
pub fn op_value_id(op: &Op, args: &[ValueId]) -> ValueId {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid-value-v1");
    let op_bytes = postcard::to_allocvec(op).expect("ops always serialise");
    h.update(&(op_bytes.len() as u64).to_le_bytes());
    h.update(&op_bytes);
    for a in args {
        h.update(&a.0);
    }
    ValueId(*h.finalize().as_bytes())
}

/// The id of a subgraph: its canonical program bytes and its inputs' ids.
pub fn subgraph_id(program_bytes: &[u8], inputs: &[ValueId]) -> SubgraphId {
    let mut h = blake3::Hasher::new();
    h.update(b"corvid-subgraph-v1");
    h.update(&(program_bytes.len() as u64).to_le_bytes());
    h.update(program_bytes);
    for i in inputs {
        h.update(&i.0);
    }
    SubgraphId(*h.finalize().as_bytes())
}
