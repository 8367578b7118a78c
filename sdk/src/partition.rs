//! The partitioner: a graph becomes a DAG of subgraphs that peers can run independently.
//!
//! 1. **Tiling.** A 2-D matmul with more rows or columns than `block` becomes a grid of block
//!    products (row blocks of A times column blocks of B; K is never split, so every element is
//!    summed exactly as in the whole product). Elementwise ops on a tiled value, and row-wise ops
//!    (softmax, reductions over columns, layer_norm, argmax, a following matmul) when the grid
//!    has one column block, are applied per tile, so an MLP runs as independent row pipelines.
//!    Tiles are assembled by `concat` in a fixed order. Slices of constants are cut here, on the
//!    requester, so a tile ships only its blocks; a slice of a recipe (a seeded random tensor)
//!    is a narrower recipe, so a tile ships a few bytes and its worker makes the block.
//! 2. **Fusion.** Each op joins the subgraph of its first computed argument when it is that
//!    value's only consumer and the subgraph stays under `max_subgraph_flops`; a subgraph
//!    under 16 MFLOP also takes any op whose computed arguments it alone holds (a backward
//!    pass reads the forward's values twice); otherwise the op starts a new one. Tiny ops of
//!    constants (at most 64 kFLOP and 64 KiB; not products, nothing assembly reads) belong to
//!    no subgraph: each subgraph that reads one makes it (an optimizer's `state * beta`, a
//!    gradient's seed), so they cost no task and tie no independent subgraphs together.
//!    Assembly (`concat`) joins nothing. Dependencies between subgraphs always point to
//!    earlier ones, so the result is a DAG in topological order.
//!
//! Everything is deterministic: the same graph and settings give the same subgraphs and ids.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use corvid_kernels::budget::{GEMM_WORKSPACE, workspace_bytes};
use corvid_kernels::{Budget, Op, Program, TensorMeta, reference, shape};

pub use crate::error::PartitionError;
use crate::error::Site;
use crate::graph::{Node, NodeId, NodeKind};
use crate::ids::{ValueId, op_value_id, subgraph_id};
use crate::plan::{Cost, Leaf, Plan, Settings, Source, Subgraph};

/// Room left in a task budget for what the byte estimates do not count (bookkeeping).
const GROUP_SLACK: u64 = 1 << 20;

/// An op of constants (or of such ops) at most this large is made by each subgraph that
/// reads it instead of being a task of its own.
const TINY_FLOPS: u64 = 64 << 10;
const TINY_BYTES: u64 = 64 << 10;
/// A subgraph this small takes every op whose computed arguments it alone holds, not only
/// the sole consumer of its values: a task costs a round trip.
const SMALL_GROUP_FLOPS: u64 = 16 << 20;

/// A node of the rewritten graph.
#[derive(Debug)]
struct PNode {
    /// `None` for a constant.
    op: Option<Op>,
    args: Vec<usize>,
    meta: TensorMeta,
    id: ValueId,
    at: Site,
    leaf: Option<usize>,
}

/// A value as a grid of tiles over rows × columns of a 2-D result (or rows of a 1-D one).
#[derive(Clone, Debug)]
struct Tiled {
    rows: Vec<(usize, usize)>,
    cols: Vec<(usize, usize)>,
    /// `tiles[r][c]`: the pnode holding that block.
    tiles: Vec<Vec<usize>>,
    meta: TensorMeta,
}

#[derive(Clone, Debug)]
enum Val {
    Plain(usize),
    Tiled(Tiled),
}

struct Builder<'a> {
    settings: &'a Settings,
    pnodes: Vec<PNode>,
    by_id: HashMap<ValueId, usize>,
    leaves: Vec<Arc<Leaf>>,
    leaf_ids: Vec<ValueId>,
}

/// Partitions the part of `nodes` that `roots` depend on.
pub(crate) fn partition(
    nodes: &[Node],
    roots: &[NodeId],
    settings: &Settings,
) -> Result<Plan, PartitionError> {
    let needed = reachable(nodes, roots);
    let mut b = Builder {
        settings,
        pnodes: Vec::new(),
        by_id: HashMap::new(),
        leaves: Vec::new(),
        leaf_ids: Vec::new(),
    };
    let mut vals: HashMap<NodeId, Val> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        if !needed[i] {
            continue;
        }
        let v = match &node.kind {
            NodeKind::Failed(e) => return Err(e.clone().into()),
            NodeKind::Leaf(data) => Val::Plain(b.leaf(data.clone(), node.id, node.at)),
            NodeKind::Op { op, args } => {
                let args: Vec<Val> = args.iter().map(|a| vals[a].clone()).collect();
                b.op(op, args, node.at)
            }
        };
        vals.insert(i, v);
    }
    let outs: Vec<usize> = roots.iter().map(|r| b.plain(vals[r].clone())).collect();
    b.group(&outs)
}

fn reachable(nodes: &[Node], roots: &[NodeId]) -> Vec<bool> {
    let mut seen = vec![false; nodes.len()];
    let mut stack: Vec<NodeId> = roots.to_vec();
    while let Some(n) = stack.pop() {
        if std::mem::replace(&mut seen[n], true) {
            continue;
        }
        if let NodeKind::Op { args, .. } = &nodes[n].kind {
            stack.extend(args);
        }
    }
    seen
}

fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Clamp { .. } | Op::Binary(_) | Op::Where | Op::Cast { .. }
    )
}

/// Ops that work on each row of a 2-D value independently.
fn is_row_wise(op: &Op, rank: usize) -> bool {
    let last = rank.saturating_sub(1);
    match op {
        Op::Softmax { axis } | Op::LogSoftmax { axis } => *axis == last,
        Op::Reduce { axes, .. } => axes == &[last] && rank == 2,
        Op::ArgMax { axis, .. } => *axis == last && rank == 2,
        Op::LayerNorm { .. } => true,
        _ => false,
    }
}

impl Builder<'_> {
    fn leaf(&mut self, data: Arc<Leaf>, id: ValueId, at: Site) -> usize {
        if let Some(&p) = self.by_id.get(&id) {
            return p;
        }
        let meta = data.meta().clone();
        self.leaves.push(data);
        self.leaf_ids.push(id);
        self.insert(PNode {
            op: None,
            args: vec![],
            meta,
            id,
            at,
            leaf: Some(self.leaves.len() - 1),
        })
    }

    fn insert(&mut self, p: PNode) -> usize {
        let id = p.id;
        self.pnodes.push(p);
        let i = self.pnodes.len() - 1;
        self.by_id.insert(id, i);
        i
    }

    /// Adds `op(args)`, deduplicated by value id. Slices of constants are cut right away.
    fn push(&mut self, op: Op, args: Vec<usize>, at: Site) -> usize {
        let ids: Vec<ValueId> = args.iter().map(|&a| self.pnodes[a].id).collect();
        let id = op_value_id(&op, &ids);
        if let Some(&p) = self.by_id.get(&id) {
            return p;
        }
        if let (
            Op::Slice {
                starts,
                ends,
                steps,
            },
            Some(leaf),
        ) = (&op, self.pnodes[args[0]].leaf)
        {
            // A window of a recipe is a recipe: no values are made here.
            let cut = match self.leaves[leaf]
                .how()
                .and_then(|r| r.slice(starts, ends, steps))
            {
                Some(window) => Leaf::recipe(window),
                None => Leaf::data(Arc::new(
                    reference::eval(&op, &[self.leaves[leaf].get()])
                        .expect("the partitioner slices within bounds"),
                )),
            };
            let p = self.leaf(Arc::new(cut), id, at);
            self.by_id.insert(id, p);
            return p;
        }
        let metas: Vec<&TensorMeta> = args.iter().map(|&a| &self.pnodes[a].meta).collect();
        let meta = shape::infer(&op, &metas).expect("the partitioner only builds valid ops");
        self.insert(PNode {
            op: Some(op),
            args,
            meta,
            id,
            at,
            leaf: None,
        })
    }

    fn op(&mut self, op: &Op, args: Vec<Val>, at: Site) -> Val {
        if let Op::MatMul = op
            && let Some(v) = self.tile_matmul(&args, at)
        {
            return v;
        }
        let tiled = args.iter().find_map(|a| match a {
            Val::Tiled(t) => Some(t.clone()),
            Val::Plain(_) => None,
        });
        if let Some(t) = tiled {
            let rank = t.meta.rank();
            let pushdown = (is_elementwise(op) && self.same_shape_out(op, &args, &t.meta))
                || (is_row_wise(op, rank) && t.cols.len() == 1 && matches!(args[0], Val::Tiled(_)));
            if pushdown {
                return self.per_tile(op, &args, &t, at);
            }
        }
        let plain: Vec<usize> = args.into_iter().map(|a| self.plain(a)).collect();
        Val::Plain(self.push(op.clone(), plain, at))
    }

    /// Whether `op` over `args` keeps the tiled value's shape (other args only broadcast in).
    fn same_shape_out(&self, op: &Op, args: &[Val], tiled: &TensorMeta) -> bool {
        let metas: Vec<TensorMeta> = args.iter().map(|a| self.meta(a)).collect();
        let refs: Vec<&TensorMeta> = metas.iter().collect();
        shape::infer(op, &refs).is_ok_and(|m| m.shape == tiled.shape)
            && metas.iter().all(|m| m.rank() <= tiled.rank())
    }

    /// Applies `op` tile by tile; other arguments are cut to each tile's region.
    fn per_tile(&mut self, op: &Op, args: &[Val], grid: &Tiled, at: Site) -> Val {
        let mut tiles = Vec::with_capacity(grid.rows.len());
        for (r, &rows) in grid.rows.iter().enumerate() {
            let mut row = Vec::with_capacity(grid.cols.len());
            for (c, &cols) in grid.cols.iter().enumerate() {
                let tile_args: Vec<usize> = args
                    .iter()
                    .enumerate()
                    .map(|(i, a)| match a {
                        Val::Tiled(t) if t.rows == grid.rows && t.cols == grid.cols => {
                            t.tiles[r][c]
                        }
                        // Row-wise ops take their extra arguments (gamma, beta) whole.
                        _ if i > 0 && !is_elementwise(op) => self.plain(a.clone()),
                        _ => {
                            let p = self.plain(a.clone());
                            self.region(p, &grid.meta.shape, rows, cols, at)
                        }
                    })
                    .collect();
                row.push(self.push(op.clone(), tile_args, at));
            }
            tiles.push(row);
        }
        let out_meta = {
            let metas: Vec<TensorMeta> = args.iter().map(|a| self.meta(a)).collect();
            shape::infer(op, &metas.iter().collect::<Vec<_>>()).expect("valid in the source graph")
        };
        let cols = if out_meta.rank() == 2 && out_meta.shape[1] != grid.meta.shape[1] {
            vec![(0, out_meta.shape[1])]
        } else {
            grid.cols.clone()
        };
        Val::Tiled(Tiled {
            rows: grid.rows.clone(),
            cols,
            tiles,
            meta: out_meta,
        })
    }

    /// The part of `p` (broadcast into `full`) that lands on the given rows and columns.
    fn region(
        &mut self,
        p: usize,
        full: &[usize],
        rows: (usize, usize),
        cols: (usize, usize),
        at: Site,
    ) -> usize {
        let shape = self.pnodes[p].meta.shape.clone();
        let lead = full.len() - shape.len();
        let ranges = [rows, cols];
        let mut starts = vec![0; shape.len()];
        let mut ends = shape.clone();
        let mut whole = true;
        for (d, &size) in shape.iter().enumerate() {
            let (s, e) = ranges[d + lead];
            if size != 1 && (s, e) != (0, size) {
                starts[d] = s;
                ends[d] = e;
                whole = false;
            }
        }
        if whole {
            return p;
        }
        let steps = vec![1; shape.len()];
        self.push(
            Op::Slice {
                starts,
                ends,
                steps,
            },
            vec![p],
            at,
        )
    }

    /// Tiles a 2-D matmul whose result has more rows or columns than a block, or whose left
    /// side is already tiled by rows (a pipeline such as an MLP).
    fn tile_matmul(&mut self, args: &[Val], at: Site) -> Option<Val> {
        let (a_meta, b_meta) = (self.meta(&args[0]), self.meta(&args[1]));
        if a_meta.rank() != 2 || b_meta.rank() != 2 {
            return None;
        }
        let (m, k, n) = (a_meta.shape[0], a_meta.shape[1], b_meta.shape[1]);
        let (bm, bn) = self.block_sizes(k);
        let a_tiled = matches!(args[0], Val::Tiled(_));
        if m <= bm && n <= bn && !a_tiled {
            return None;
        }
        // Row blocks of A: an upstream tiling's rows, or fresh slices.
        let (rows, a_blocks): (Vec<(usize, usize)>, Vec<usize>) = match &args[0] {
            Val::Tiled(t) => {
                let blocks = (0..t.rows.len())
                    .map(|r| self.assemble_row(t, r, at))
                    .collect();
                (t.rows.clone(), blocks)
            }
            Val::Plain(p) => {
                let rows = ranges(m, bm);
                let blocks = rows
                    .iter()
                    .map(|&r| self.region(*p, &[m, k], r, (0, k), at))
                    .collect();
                (rows, blocks)
            }
        };
        let b = self.plain(args[1].clone());
        let cols = ranges(n, bn);
        let b_blocks: Vec<usize> = cols
            .iter()
            .map(|&c| self.region(b, &[k, n], (0, k), c, at))
            .collect();
        let tiles = a_blocks
            .iter()
            .map(|&a| {
                b_blocks
                    .iter()
                    .map(|&bb| self.push(Op::MatMul, vec![a, bb], at))
                    .collect()
            })
            .collect();
        Some(Val::Tiled(Tiled {
            rows,
            cols,
            tiles,
            meta: TensorMeta::f32(vec![m, n]),
        }))
    }

    /// Block sizes for a product with inner size `k`, shrunk until every block fits the
    /// tensor limit and a tile's product (its blocks, result and a few results' worth of the
    /// ops fused after it) fits the task budget.
    fn block_sizes(&self, k: usize) -> (usize, usize) {
        let limit = self.settings.max_tensor_bytes;
        let budget = self.settings.task_budget.as_ref();
        let mut b = self.settings.block.max(1);
        let fits = |b: usize| {
            let (b, k) = (b as u64, k as u64);
            let (bk, bb) = (b.saturating_mul(k).saturating_mul(4), b * b * 4);
            let fits_budget = budget.is_none_or(|t| {
                let bytes = bk
                    .saturating_mul(2)
                    .saturating_add(bb.saturating_mul(4))
                    .saturating_add(GEMM_WORKSPACE + GROUP_SLACK);
                let flops = bk.saturating_mul(b) / 2;
                bytes <= t.max_peak_bytes && flops <= t.max_flops
            });
            bk <= limit && bb <= limit && fits_budget
        };
        while b > 1 && !fits(b) {
            b /= 2;
        }
        (b, b)
    }

    fn meta(&self, v: &Val) -> TensorMeta {
        match v {
            Val::Plain(p) => self.pnodes[*p].meta.clone(),
            Val::Tiled(t) => t.meta.clone(),
        }
    }

    /// Row block `r` of a tiled value as one node.
    fn assemble_row(&mut self, t: &Tiled, r: usize, at: Site) -> usize {
        if t.cols.len() == 1 {
            return t.tiles[r][0];
        }
        self.push(Op::Concat { axis: 1 }, t.tiles[r].clone(), at)
    }

    /// The whole value as one node: tiles concatenated along columns, then rows.
    fn plain(&mut self, v: Val) -> usize {
        match v {
            Val::Plain(p) => p,
            Val::Tiled(t) => {
                let at = self.pnodes[t.tiles[0][0]].at;
                let rows: Vec<usize> = (0..t.rows.len())
                    .map(|r| self.assemble_row(&t, r, at))
                    .collect();
                if rows.len() == 1 {
                    rows[0]
                } else {
                    self.push(Op::Concat { axis: 0 }, rows, at)
                }
            }
        }
    }

    /// Cuts the rewritten graph into subgraphs (see the module docs).
    fn group(self, outs: &[usize]) -> Result<Plan, PartitionError> {
        let n = self.pnodes.len();
        let mut needed = vec![false; n];
        let mut stack = outs.to_vec();
        while let Some(p) = stack.pop() {
            if !std::mem::replace(&mut needed[p], true) {
                stack.extend(&self.pnodes[p].args);
            }
        }
        let mut consumers = vec![0usize; n];
        for (i, p) in self.pnodes.iter().enumerate() {
            if needed[i] {
                for &a in &p.args {
                    consumers[a] += 1;
                }
            }
        }
        let flops = |p: &PNode| -> u64 {
            let ins: Vec<&TensorMeta> = p.args.iter().map(|&a| &self.pnodes[a].meta).collect();
            p.op.as_ref().map_or(0, |op| op.flops(&ins, &p.meta))
        };
        // What one group may hold: a conservative sum (every member's output, workspace and
        // arguments) that bounds the peak the validator will compute.
        let budget = self.settings.task_budget.as_ref();
        let max_nodes = budget.map_or(Budget::MAX_NODES, |b| b.max_nodes);
        let max_bytes = budget.map_or(u64::MAX, |b| b.max_peak_bytes.saturating_sub(GROUP_SLACK));
        let max_flops = budget.map_or(self.settings.max_subgraph_flops, |b| {
            b.max_flops.min(self.settings.max_subgraph_flops)
        });
        let bytes = |p: &PNode| -> u64 {
            let ins: Vec<&TensorMeta> = p.args.iter().map(|&a| &self.pnodes[a].meta).collect();
            let args = ins.iter().fold(0u64, |s, m| s.saturating_add(m.bytes()));
            p.op.as_ref().map_or(0, |op| {
                workspace_bytes(op, &ins, &p.meta)
                    .saturating_add(p.meta.bytes())
                    .saturating_add(args)
            })
        };
        let mut group_of: Vec<Option<usize>> = vec![None; n];
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_flops: Vec<u64> = Vec::new();
        let mut group_bytes: Vec<u64> = Vec::new();
        // Tiny ops of constants (and of such ops) belong to no subgraph: each subgraph that
        // reads one makes it itself (a gradient's seed, an optimizer's `state * beta`), so
        // they neither cost a task nor tie independent subgraphs to a shared one.
        let mut inline = vec![false; n];
        // Per group, the tiny ops its subgraph will make (charged to it).
        let mut charged: Vec<HashSet<usize>> = Vec::new();
        let mut read_by_concat = vec![false; n];
        for (i, p) in self.pnodes.iter().enumerate() {
            if needed[i] && matches!(p.op, Some(Op::Concat { .. })) {
                for &a in &p.args {
                    read_by_concat[a] = true;
                }
            }
        }
        for (i, p) in self.pnodes.iter().enumerate() {
            if !needed[i] || p.leaf.is_some() {
                continue;
            }
            let f = flops(p);
            let pb = bytes(p);
            let concat = matches!(p.op, Some(Op::Concat { .. }));
            // Not products (a tile is work to spread) and nothing assembly reads (it runs no
            // arithmetic).
            let product = matches!(p.op, Some(Op::MatMul | Op::Conv2d { .. }));
            if !concat
                && !product
                && !read_by_concat[i]
                && f <= TINY_FLOPS
                && p.meta.bytes() <= TINY_BYTES
                && !outs.contains(&i)
                && p.args
                    .iter()
                    .all(|&a| self.pnodes[a].leaf.is_some() || inline[a])
            {
                inline[i] = true;
                continue;
            }
            // The tiny ops it reads, which its subgraph will make: charged to the subgraph
            // once, like members.
            let mut made = Vec::new();
            let mut stack = p.args.clone();
            while let Some(a) = stack.pop() {
                if inline[a] && !made.contains(&a) {
                    made.push(a);
                    stack.extend(&self.pnodes[a].args);
                }
            }
            let extra = |g: Option<usize>| {
                made.iter()
                    .filter(|a| g.is_none_or(|g| !charged[g].contains(*a)))
                    .fold((f, pb, 1), |(f, b, k), &a| {
                        let q = &self.pnodes[a];
                        (
                            f.saturating_add(flops(q)),
                            b.saturating_add(bytes(q)),
                            k + 1,
                        )
                    })
            };
            let fits = |g: usize, cap: u64| {
                let (f, b, k) = extra(Some(g));
                group_flops[g].saturating_add(f) <= cap
                    && group_bytes[g].saturating_add(b) <= max_bytes
                    && groups[g].len() + charged[g].len() + k <= max_nodes
            };
            let main = p
                .args
                .iter()
                .copied()
                .find(|&a| self.pnodes[a].leaf.is_none() && !inline[a]);
            let join = main.and_then(|m| {
                let g = group_of[m]?;
                let others_ok = p.args.iter().all(|&a| match group_of[a] {
                    None => true,
                    Some(h) => h <= g,
                });
                (consumers[m] == 1 && others_ok && !concat && fits(g, max_flops)).then_some(g)
            });
            // A small group takes any op whose computed arguments it alone holds (values read
            // twice, as a backward pass reads the forward's, stay together): splitting it
            // would cost round trips, not save time. One that also reads other groups' values
            // (a sum of shards' gradients) waits for them, so it starts its own: the group
            // stays free to run beside them.
            let join = join.or_else(|| {
                let g = group_of[main?]?;
                let alone = p.args.iter().all(|&a| group_of[a].is_none_or(|h| h == g));
                (alone && !concat && fits(g, SMALL_GROUP_FLOPS.min(max_flops))).then_some(g)
            });
            let (ef, eb, _) = extra(join);
            let g = join.unwrap_or_else(|| {
                groups.push(Vec::new());
                group_flops.push(0);
                group_bytes.push(0);
                charged.push(HashSet::new());
                groups.len() - 1
            });
            charged[g].extend(made);
            groups[g].push(i);
            group_flops[g] = group_flops[g].saturating_add(ef);
            group_bytes[g] = group_bytes[g].saturating_add(eb);
            group_of[i] = Some(g);
        }
        // Values each group must export: read by a later group, or requested.
        let mut exported = vec![false; n];
        for &o in outs {
            exported[o] = true;
        }
        for (i, p) in self.pnodes.iter().enumerate() {
            if needed[i] {
                for &a in &p.args {
                    if group_of[a].is_some() && group_of[a] != group_of[i] {
                        exported[a] = true;
                    }
                }
            }
        }
        let mut subgraphs = Vec::with_capacity(groups.len());
        // Where each exported pnode ends up: (subgraph, output index).
        let mut located: HashMap<usize, (usize, usize)> = HashMap::new();
        for (g, members) in groups.iter().enumerate() {
            let sg = self.subgraph(g, members, &group_of, &inline, &exported, &located)?;
            for (o, &p) in members.iter().filter(|&&p| exported[p]).enumerate() {
                located.insert(p, (g, o));
            }
            subgraphs.push(sg);
        }
        let source = |p: usize| match self.pnodes[p].leaf {
            Some(l) => Source::Leaf(l),
            None => {
                let (subgraph, output) = located[&p];
                Source::Output { subgraph, output }
            }
        };
        let outputs = outs.iter().map(|&o| source(o)).collect();
        Ok(Plan {
            leaves: self.leaves,
            leaf_ids: self.leaf_ids,
            subgraphs,
            outputs,
        })
    }

    fn subgraph(
        &self,
        g: usize,
        members: &[usize],
        group_of: &[Option<usize>],
        inline: &[bool],
        exported: &[bool],
        located: &HashMap<usize, (usize, usize)>,
    ) -> Result<Subgraph, PartitionError> {
        let limit = self.settings.max_tensor_bytes;
        // The tiny ops of constants the members read, made here first (in graph order).
        let mut made = Vec::new();
        let mut stack: Vec<usize> = members
            .iter()
            .flat_map(|&m| &self.pnodes[m].args)
            .copied()
            .collect();
        while let Some(a) = stack.pop() {
            if inline[a] && !made.contains(&a) {
                made.push(a);
                stack.extend(&self.pnodes[a].args);
            }
        }
        made.sort_unstable();
        let members: Vec<usize> = made.into_iter().chain(members.iter().copied()).collect();
        let members = &members[..];
        let mut local: HashMap<usize, u32> = HashMap::new();
        let mut inputs = Vec::new();
        let mut input_ids = Vec::new();
        let mut input_metas = Vec::new();
        for &m in members {
            for &a in &self.pnodes[m].args {
                if group_of[a] == Some(g) || inline[a] || local.contains_key(&a) {
                    continue;
                }
                let pa = &self.pnodes[a];
                local.insert(a, inputs.len() as u32);
                inputs.push(match pa.leaf {
                    Some(l) => Source::Leaf(l),
                    None => {
                        let (subgraph, output) = located[&a];
                        Source::Output { subgraph, output }
                    }
                });
                input_ids.push(pa.id);
                input_metas.push(pa.meta.clone());
            }
        }
        let mut program = Program::new(input_metas);
        let mut cost = Cost::default();
        for meta in &program.inputs {
            cost.bytes_in += meta.bytes();
        }
        for &m in members {
            let p = &self.pnodes[m];
            let op = p.op.clone().expect("only ops are grouped");
            if p.meta.bytes() > limit {
                return Err(PartitionError::TooLarge {
                    op: op.to_string(),
                    at: p.at,
                    meta: p.meta.clone(),
                    bytes: p.meta.bytes(),
                    limit,
                });
            }
            let args: Vec<u32> = p.args.iter().map(|a| local[a]).collect();
            let ins: Vec<&TensorMeta> = p.args.iter().map(|&a| &self.pnodes[a].meta).collect();
            cost.flops += op.flops(&ins, &p.meta);
            let v = program.push(op, &args);
            local.insert(m, v);
        }
        let mut output_ids = Vec::new();
        for &m in members.iter().filter(|&&m| exported[m]) {
            program.outputs.push(local[&m]);
            output_ids.push(self.pnodes[m].id);
            cost.bytes_out += self.pnodes[m].meta.bytes();
        }
        for (i, m) in program.inputs.iter().enumerate() {
            if m.bytes() > limit {
                return Err(PartitionError::TooLarge {
                    op: format!("input {i}"),
                    at: self.pnodes[members[0]].at,
                    meta: m.clone(),
                    bytes: m.bytes(),
                    limit,
                });
            }
        }
        Ok(Subgraph {
            id: subgraph_id(&program.canonical_bytes(), &input_ids),
            program,
            inputs,
            input_ids,
            output_ids,
            cost,
        })
    }
}

/// `0..n` cut into consecutive ranges of at most `block`.
fn ranges(n: usize, block: usize) -> Vec<(usize, usize)> {
    (0..n.div_ceil(block).max(1))
        .map(|i| (i * block, ((i + 1) * block).min(n)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn ranges_cover_everything_once() {
        assert_eq!(ranges(10, 4), vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(ranges(4, 4), vec![(0, 4)]);
        assert_eq!(ranges(0, 4), vec![(0, 0)]);
    }
}
