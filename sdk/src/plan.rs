//! The unit of distributed work: subgraphs that any peer can run, with ids any requester can
//! recognise, and the DAG that connects them.

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use corvid_kernels::{Budget, Program, Recipe, Tensor as Data, TensorMeta};
use serde::{Deserialize, Serialize};

use crate::ids::{SubgraphId, ValueId};

/// What a subgraph costs to run and ship: what a scheduler needs to place it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub flops: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Where a subgraph input (or a plan output) comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// A constant of the plan, by index into [`Plan::leaves`].
    Leaf(usize),
    /// Output `output` of subgraph `subgraph` (an index into [`Plan::subgraphs`]).
    Output { subgraph: usize, output: usize },
}

/// A self-contained piece of work: a kernels program and where its inputs come from.
#[derive(Clone, Debug, PartialEq)]
pub struct Subgraph {
    /// blake3 over the canonical program and the inputs' value ids.
    pub id: SubgraphId,
    pub program: Program,
    pub inputs: Vec<Source>,
    pub input_ids: Vec<ValueId>,
    pub output_ids: Vec<ValueId>,
    pub cost: Cost,
}

impl Subgraph {
    /// The ops it runs, e.g. `matmul, add, relu`.
    pub fn ops(&self) -> String {
        let names: Vec<&str> = self.program.nodes.iter().map(|n| n.op.name()).collect();
        names.join(", ")
    }

    /// Indices of the subgraphs whose outputs this one reads.
    pub fn deps(&self) -> impl Iterator<Item = usize> + '_ {
        self.inputs.iter().filter_map(|s| match s {
            Source::Output { subgraph, .. } => Some(*subgraph),
            Source::Leaf(_) => None,
        })
    }
}

/// How the partitioner cuts graphs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Matmuls with more rows or columns than this are tiled into blocks of at most this size.
    pub block: usize,
    /// Largest tensor a subgraph may hold, in bytes: the executing backend's binding limit.
    pub max_tensor_bytes: u64,
    /// A subgraph stops absorbing ops past this many FLOPs.
    pub max_subgraph_flops: u64,
    /// What every subgraph must fit (a worker's advertised budget): tiles shrink and fusion
    /// stops to stay within it. `None`: only the structure limits of [`Budget`].
    #[serde(default)]
    pub task_budget: Option<Budget>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            block: 1024,
            max_tensor_bytes: u64::MAX,
            max_subgraph_flops: 8 << 30,
            task_budget: None,
        }
    }
}

impl Settings {
    /// These settings, cut so that subgraphs fit `budget` too.
    pub fn within(mut self, budget: &Budget) -> Settings {
        self.max_tensor_bytes = self.max_tensor_bytes.min(budget.max_tensor_bytes);
        self.task_budget = Some(match &self.task_budget {
            Some(b) => b.min(budget),
            None => budget.clone(),
        });
        self
    }
}

/// A constant: its values, or a recipe that makes them where they are needed. A recipe leaf
/// travels as its recipe; the values are made on a requester only when something reads them
/// (a local run, a check), once.
#[derive(Debug)]
pub struct Leaf {
    recipe: Option<Recipe>,
    meta: TensorMeta,
    data: OnceLock<Arc<Data>>,
}

impl Leaf {
    pub fn data(data: Arc<Data>) -> Leaf {
        Leaf {
            recipe: None,
            meta: data.meta(),
            data: OnceLock::from(data),
        }
    }

    /// A leaf made from `recipe`, which must pass [`Recipe::check`].
    pub fn recipe(recipe: Recipe) -> Leaf {
        Leaf {
            meta: recipe.meta(),
            recipe: Some(recipe),
            data: OnceLock::new(),
        }
    }

    /// Its recipe, if it has one.
    pub fn how(&self) -> Option<&Recipe> {
        self.recipe.as_ref()
    }

    pub fn meta(&self) -> &TensorMeta {
        &self.meta
    }

    /// Its values, made now if they have not been yet.
    pub fn get(&self) -> &Arc<Data> {
        self.data.get_or_init(|| {
            let recipe = self.recipe.as_ref().expect("a leaf has data or a recipe");
            Arc::new(
                recipe
                    .materialise()
                    .expect("leaf recipes are checked when built"),
            )
        })
    }
}

/// A partitioned graph: constants, subgraphs in topological order, and the requested outputs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub leaves: Vec<Arc<Leaf>>,
    pub leaf_ids: Vec<ValueId>,
    pub subgraphs: Vec<Subgraph>,
    pub outputs: Vec<Source>,
}

impl Plan {
    /// The sum of every subgraph's cost.
    pub fn total_cost(&self) -> Cost {
        self.subgraphs.iter().fold(Cost::default(), |a, s| Cost {
            flops: a.flops + s.cost.flops,
            bytes_in: a.bytes_in + s.cost.bytes_in,
            bytes_out: a.bytes_out + s.cost.bytes_out,
        })
    }

    /// A table of the subgraph DAG: id, ops, inputs, cost.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>3}  {:<12}  {:>10}  {:>10}  {:>10}  {:<18}  ops",
            "#", "id", "MFLOP", "in KiB", "out KiB", "after"
        );
        for (i, sg) in self.subgraphs.iter().enumerate() {
            let deps: Vec<String> = sg.deps().map(|d| d.to_string()).collect();
            let _ = writeln!(
                s,
                "{:>3}  {:<12}  {:>10.1}  {:>10.1}  {:>10.1}  {:<18}  {}",
                i,
                sg.id.short(),
                sg.cost.flops as f64 / 1e6,
                sg.cost.bytes_in as f64 / 1024.0,
                sg.cost.bytes_out as f64 / 1024.0,
                if deps.is_empty() {
                    "-".into()
                } else {
                    deps.join(",")
                },
                sg.ops()
            );
        }
        s
    }
}
