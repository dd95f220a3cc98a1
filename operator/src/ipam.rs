//! Block allocation: which pod address blocks each node holds.
//!
//! ```text
//!  IPPools ─┐
//!  Nodes ───┼──▶ allocate() ──▶ Allocation { per node: blocks + problems,
//!  NodeNetwork.spec.podCIDRs ┘                per pool: usage, overlaps }
//!  (the record of what is held)
//! ```
//!
//! Pure: values in, values out, no clock and no client. The function is a
//! full recomputation from the current objects, so it is level-triggered and
//! restart-safe by construction: the `NodeNetwork`s are the only record of
//! what is held, and feeding an allocation back in as the record yields the
//! same allocation (a restarted operator writes nothing).
//!
//! Rules, in the order they are applied:
//! 1. Pools are ordered by creation (then name). Of two pools whose CIDRs
//!    overlap, the newer gives out nothing; both are reported as overlapping.
//! 2. The record is validated: blocks of nodes that no longer exist are
//!    released; a block that overlaps one already accepted (a hand edit, or a
//!    bug elsewhere) is dropped from the later node, in node-name order, and
//!    reported. Everything else a live node holds stays with it, whatever
//!    changed (labels, pool disabled or being deleted): blocks never move.
//! 3. Each live node without a block of a family gets the lowest free block
//!    of the first pool (in pool order) of that family that selects it and
//!    gives out blocks (not disabled, not being deleted, not overlapping an
//!    earlier pool). A node holds at most one block per family.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use trellis_policy::selector::Selector;

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    const ALL: [Family; 2] = [Family::V4, Family::V6];
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// What allocation needs to know about an `IPPool`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub name: String,
    pub cidr: IpNet,
    /// Prefix length of the blocks.
    pub block_prefix: u8,
    pub selector: Selector,
    pub disabled: bool,
    /// `metadata.deletionTimestamp` is set: the pool waits (finalizer) for
    /// its blocks to be released and gives out no new ones.
    pub deleting: bool,
    /// Creation time (Unix seconds); with the name, orders pools so the
    /// older of two overlapping pools wins.
    pub created: i64,
}

/// What allocation needs to know about a `Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Blocks a `NodeNetwork` records as held by its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub node: String,
    pub blocks: Vec<IpNet>,
}

/// Why a node lacks a block, or lost one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// No pool of either family selects the node.
    NoMatchingPool,
    /// Pools of this family select the node, but every one is full.
    PoolsExhausted { family: Family, pools: Vec<String> },
    /// Pools of this family select the node, but none gives out blocks
    /// (disabled, being deleted, or overlapping an older pool).
    NoAllocatablePool { family: Family, pools: Vec<String> },
    /// The node's record claimed `block`, which overlaps a block held by
    /// `holder`; the claim was dropped.
    Conflict { block: IpNet, holder: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoMatchingPool => f.write_str("no IPPool selects this node"),
            Problem::PoolsExhausted { family, pools } => {
                write!(
                    f,
                    "every {family} pool that selects this node is full: {}",
                    pools.join(", ")
                )
            }
            Problem::NoAllocatablePool { family, pools } => write!(
                f,
                "no {family} pool that selects this node gives out blocks (disabled, deleting or overlapping): {}",
                pools.join(", ")
            ),
            Problem::Conflict { block, holder } => {
                write!(
                    f,
                    "recorded block {block} overlaps a block held by node {holder}; dropped"
                )
            }
        }
    }
}

/// The blocks of one live node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeBlocks {
    /// IPv4 blocks first, then IPv6, each in address order.
    pub blocks: Vec<IpNet>,
    pub problems: Vec<Problem>,
}

/// How a pool is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    /// Blocks of `block_prefix` in the pool.
    pub total: u128,
    /// Blocks held by nodes inside the pool.
    pub used: u128,
    /// Pools whose CIDR overlaps this one.
    pub overlaps: Vec<String>,
    /// The older of those: while any exists, this pool gives out nothing.
    pub yields_to: Vec<String>,
    /// Whether the pool gives out new blocks (not disabled, not deleting,
    /// not overlapping an older allocating pool).
    pub allocating: bool,
    /// Nodes that wanted a block from this pool and found it full.
    pub starved: Vec<String>,
}

/// The result of [`allocate`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Every live node, by name.
    pub nodes: BTreeMap<String, NodeBlocks>,
    /// Every pool, by name.
    pub pools: BTreeMap<String, PoolUsage>,
}

impl Allocation {
    /// The record this allocation leaves behind, as the `NodeNetwork`s carry it.
    pub fn held(&self) -> Vec<Held> {
        self.nodes
            .iter()
            .map(|(node, b)| Held {
                node: node.clone(),
                blocks: b.blocks.clone(),
            })
            .collect()
    }
}

/// Computes which blocks every node holds. See the module documentation.
pub fn allocate(pools: &[Pool], nodes: &[Node], record: &[Held]) -> Allocation {
    let mut ordered: Vec<&Pool> = pools.iter().collect();
    ordered.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));

    // 1. Overlaps, pairwise: of two overlapping pools the newer gives nothing
    // (even when the older is disabled, deleting, or itself newer than a
    // third pool), so each pair can be judged on its own.
    let mut usage: BTreeMap<String, PoolUsage> = BTreeMap::new();
    for (i, pool) in ordered.iter().enumerate() {
        let overlaps: Vec<String> = ordered
            .iter()
            .filter(|other| other.name != pool.name && nets_overlap(&other.cidr, &pool.cidr))
            .map(|other| other.name.clone())
            .collect();
        let yields_to: Vec<String> = ordered[..i]
            .iter()
            .filter(|older| nets_overlap(&older.cidr, &pool.cidr))
            .map(|older| older.name.clone())
            .collect();
        let allocating = yields_to.is_empty() && !pool.disabled && !pool.deleting;
        usage.insert(
            pool.name.clone(),
            PoolUsage {
                total: block_count(&pool.cidr, pool.block_prefix),
                used: 0,
                overlaps,
                yields_to,
                allocating,
                starved: Vec::new(),
            },
        );
    }

    // 2. Validate the record against live nodes and against itself.
    let live: BTreeMap<&str, &Node> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut result: BTreeMap<String, NodeBlocks> = live
        .keys()
        .map(|n| ((*n).to_owned(), NodeBlocks::default()))
        .collect();
    let mut claims: Vec<(&str, IpNet)> = record
        .iter()
        .filter(|h| live.contains_key(h.node.as_str()))
        .flat_map(|h| h.blocks.iter().map(move |b| (h.node.as_str(), b.trunc())))
        .collect();
    claims.sort();
    claims.dedup();
    let mut taken = Taken::default();
    for (node, block) in claims {
        match taken.holder_of(&block) {
            Some(holder) => {
                let holder = holder.to_owned();
                let entry = result.get_mut(node).expect("claims are of live nodes");
                entry.problems.push(Problem::Conflict { block, holder });
            }
            None => {
                taken.insert(block, node);
                result
                    .get_mut(node)
                    .expect("claims are of live nodes")
                    .blocks
                    .push(block);
            }
        }
    }

    // 3. Give a block of each family to nodes that lack one.
    let mut cursors: BTreeMap<&str, Cursor> = BTreeMap::new();
    for (name, node) in &live {
        let entry = result.get_mut(*name).expect("every live node has an entry");
        let mut selected_any = false;
        for family in Family::ALL {
            let candidates: Vec<&Pool> = ordered
                .iter()
                .copied()
                .filter(|p| Family::of(&p.cidr) == family && p.selector.matches(&node.labels))
                .collect();
            selected_any |= !candidates.is_empty();
            if candidates.is_empty() || entry.blocks.iter().any(|b| Family::of(b) == family) {
                continue;
            }
            let allocating: Vec<&Pool> = candidates
                .iter()
                .copied()
                .filter(|p| usage[&p.name].allocating)
                .collect();
            if allocating.is_empty() {
                entry.problems.push(Problem::NoAllocatablePool {
                    family,
                    pools: candidates.iter().map(|p| p.name.clone()).collect(),
                });
                continue;
            }
            let mut got = None;
            for pool in &allocating {
                let cursor = cursors
                    .entry(pool.name.as_str())
                    .or_insert_with(|| Cursor::new(pool));
                if let Some(block) = cursor.next_free(&taken) {
                    got = Some(block);
                    break;
                }
            }
            match got {
                Some(block) => {
                    taken.insert(block, name);
                    entry.blocks.push(block);
                }
                None => {
                    for pool in &allocating {
                        if let Some(u) = usage.get_mut(&pool.name) {
                            u.starved.push((*name).to_owned());
                        }
                    }
                    entry.problems.push(Problem::PoolsExhausted {
                        family,
                        pools: allocating.iter().map(|p| p.name.clone()).collect(),
                    });
                }
            }
        }
        if !selected_any && entry.blocks.is_empty() {
            entry.problems.push(Problem::NoMatchingPool);
        }
        entry
            .blocks
            .sort_by_key(|b| (Family::of(b), b.network(), b.prefix_len()));
    }

    // Usage: blocks inside each pool, whoever holds them.
    for pool in &ordered {
        let used = result
            .values()
            .flat_map(|n| n.blocks.iter())
            .filter(|b| pool.cidr.contains(*b))
            .count();
        if let Some(u) = usage.get_mut(&pool.name) {
            u.used = used as u128;
        }
    }

    Allocation {
        nodes: result,
        pools: usage,
    }
}

/// Whether two networks share an address.
pub fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Number of `/prefix` blocks in `net` (0 when the blocks would be larger
/// than the net; saturating at `u128::MAX` for `::/0` with `/128` blocks).
pub fn block_count(net: &IpNet, prefix: u8) -> u128 {
    let bits = u32::from(prefix).checked_sub(u32::from(net.prefix_len()));
    match bits {
        None => 0,
        Some(b) if b >= 128 => u128::MAX,
        Some(b) => 1u128 << b,
    }
}

/// An address as a number in its family's space.
fn to_u128(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Inclusive address range of a network, as numbers.
fn span(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// Blocks already held, per family, as disjoint inclusive ranges.
#[derive(Default)]
struct Taken<'a> {
    ranges: BTreeMap<(Family, u128), (u128, &'a str)>,
}

impl<'a> Taken<'a> {
    /// The holder of a held block that overlaps `net`, if any.
    fn holder_of(&self, net: &IpNet) -> Option<&'a str> {
        let family = Family::of(net);
        let (first, last) = span(net);
        // Ranges are disjoint and sorted by start, so only the last range
        // starting at or before `last` can overlap.
        let (&(f, _start), &(end, holder)) = self.ranges.range(..=(family, last)).next_back()?;
        (f == family && end >= first).then_some(holder)
    }

    fn insert(&mut self, net: IpNet, holder: &'a str) {
        let (first, last) = span(&net);
        self.ranges
            .insert((Family::of(&net), first), (last, holder));
    }

    /// The end of the held range overlapping `[first, last]` of `family`.
    fn overlapping_end(&self, family: Family, first: u128, last: u128) -> Option<u128> {
        let (&(f, _), &(end, _)) = self.ranges.range(..=(family, last)).next_back()?;
        (f == family && end >= first).then_some(end)
    }
}

/// Walks one pool's blocks in address order, skipping held ranges. Blocks
/// below the cursor are all taken, so a batch of allocations costs
/// O((allocations + held) · log held) per pool, not a scan per node.
struct Cursor {
    family: Family,
    base: u128,
    size: u128,
    count: u128,
    next: u128,
}

impl Cursor {
    fn new(pool: &Pool) -> Self {
        let size_bits = match pool.cidr {
            IpNet::V4(_) => 32u32,
            IpNet::V6(_) => 128u32,
        } - u32::from(pool.block_prefix);
        Cursor {
            family: Family::of(&pool.cidr),
            base: span(&pool.cidr).0,
            size: if size_bits >= 128 {
                u128::MAX
            } else {
                1u128 << size_bits
            },
            count: block_count(&pool.cidr, pool.block_prefix),
            next: 0,
        }
    }

    /// The lowest free block at or after the cursor, advancing past it.
    fn next_free(&mut self, taken: &Taken<'_>) -> Option<IpNet> {
        while self.next < self.count {
            let first = self.base + self.next * self.size;
            let last = first + (self.size - 1);
            match taken.overlapping_end(self.family, first, last) {
                Some(end) => {
                    // Jump to the first block that starts after the held range.
                    let past = (end - self.base) / self.size + 1;
                    self.next = past.max(self.next + 1);
                }
                None => {
                    self.next += 1;
                    return Some(self.block_at(first));
                }
            }
        }
        None
    }

    fn block_at(&self, first: u128) -> IpNet {
        let prefix_bits = u128::BITS - self.size.leading_zeros() - 1;
        match self.family {
            Family::V4 => {
                let addr = Ipv4Addr::from(u32::try_from(first).unwrap_or(u32::MAX));
                let prefix = 32 - u8::try_from(prefix_bits).unwrap_or(32);
                IpNet::V4(Ipv4Net::new(addr, prefix).unwrap_or_default())
            }
            Family::V6 => {
                let prefix = 128 - u8::try_from(prefix_bits).unwrap_or(128);
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(first), prefix).unwrap_or_default())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::v1alpha1::LabelSelector;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn mk_pool(name: &str, cidr: &str, block_prefix: u8, created: i64) -> Pool {
        Pool {
            name: name.into(),
            cidr: net(cidr),
            block_prefix,
            selector: Selector::everything(),
            disabled: false,
            deleting: false,
            created,
        }
    }

    fn mk_node(name: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    fn blocks(a: &Allocation, node: &str) -> Vec<String> {
        a.nodes[node]
            .blocks
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn nodes_get_the_lowest_free_blocks_in_name_order() {
        let pools = [mk_pool("p", "10.244.0.0/16", 24, 0)];
        let nodes = [mk_node("b", &[]), mk_node("a", &[]), mk_node("c", &[])];
        let a = allocate(&pools, &nodes, &[]);
        assert_eq!(blocks(&a, "a"), ["10.244.0.0/24"]);
        assert_eq!(blocks(&a, "b"), ["10.244.1.0/24"]);
        assert_eq!(blocks(&a, "c"), ["10.244.2.0/24"]);
        assert_eq!((a.pools["p"].used, a.pools["p"].total), (3, 256));
    }

    #[test]
    fn held_blocks_never_move_when_nodes_come_and_go() {
        let pools = [mk_pool("p", "10.244.0.0/16", 24, 0)];
        let first = allocate(&pools, &[mk_node("m", &[]), mk_node("n", &[])], &[]);
        // A node sorting before both joins; "m" leaves.
        let second = allocate(
            &pools,
            &[mk_node("a", &[]), mk_node("n", &[])],
            &first.held(),
        );
        assert_eq!(
            blocks(&second, "n"),
            blocks(&first, "n"),
            "n keeps its block"
        );
        assert_eq!(
            blocks(&second, "a"),
            ["10.244.0.0/24"],
            "a takes m's released block"
        );
        assert!(!second.nodes.contains_key("m"));
    }

    #[test]
    fn the_record_is_a_fixpoint() {
        let pools = [
            mk_pool("v4", "10.244.0.0/16", 24, 0),
            mk_pool("v6", "fd00:10:244::/56", 120, 1),
        ];
        let nodes: Vec<Node> = (0..20)
            .map(|i| mk_node(&format!("node-{i:02}"), &[]))
            .collect();
        let a = allocate(&pools, &nodes, &[]);
        assert_eq!(allocate(&pools, &nodes, &a.held()), a);
    }

    #[test]
    fn dual_stack_nodes_get_one_block_per_family() {
        let pools = [
            mk_pool("v6", "fd00:10:244::/56", 120, 0),
            mk_pool("v4", "10.244.0.0/16", 24, 1),
        ];
        let a = allocate(&pools, &[mk_node("n", &[])], &[]);
        assert_eq!(blocks(&a, "n"), ["10.244.0.0/24", "fd00:10:244::/120"]);
    }

    #[test]
    fn selectors_choose_pools_and_unselected_nodes_say_so() {
        let mut edge = mk_pool("edge", "10.250.0.0/16", 24, 0);
        edge.selector = Selector::from(&LabelSelector {
            match_labels: [("zone".to_owned(), "edge".to_owned())].into(),
            ..Default::default()
        });
        let a = allocate(
            &[edge],
            &[mk_node("e", &[("zone", "edge")]), mk_node("x", &[])],
            &[],
        );
        assert_eq!(blocks(&a, "e"), ["10.250.0.0/24"]);
        assert!(a.nodes["x"].blocks.is_empty());
        assert_eq!(a.nodes["x"].problems, [Problem::NoMatchingPool]);
    }

    #[test]
    fn a_full_pool_gives_nothing_and_names_the_starved_node() {
        let pools = [mk_pool("small", "10.0.0.0/23", 24, 0)];
        let nodes = [mk_node("a", &[]), mk_node("b", &[]), mk_node("c", &[])];
        let a = allocate(&pools, &nodes, &[]);
        assert_eq!(blocks(&a, "a"), ["10.0.0.0/24"]);
        assert_eq!(blocks(&a, "b"), ["10.0.1.0/24"]);
        assert!(a.nodes["c"].blocks.is_empty());
        assert_eq!(
            a.nodes["c"].problems,
            [Problem::PoolsExhausted {
                family: Family::V4,
                pools: vec!["small".into()]
            }]
        );
        assert_eq!(a.pools["small"].starved, ["c"]);
    }

    #[test]
    fn a_full_pool_spills_into_the_next_matching_pool() {
        let pools = [
            mk_pool("first", "10.0.0.0/24", 24, 0),
            mk_pool("second", "10.1.0.0/16", 24, 1),
        ];
        let a = allocate(&pools, &[mk_node("a", &[]), mk_node("b", &[])], &[]);
        assert_eq!(blocks(&a, "a"), ["10.0.0.0/24"]);
        assert_eq!(blocks(&a, "b"), ["10.1.0.0/24"]);
    }

    #[test]
    fn the_newer_of_two_overlapping_pools_gives_nothing() {
        let pools = [
            mk_pool("newer", "10.244.128.0/17", 24, 5),
            mk_pool("older", "10.244.0.0/16", 24, 1),
        ];
        let a = allocate(&pools, &[mk_node("a", &[])], &[]);
        assert_eq!(blocks(&a, "a"), ["10.244.0.0/24"]);
        assert!(a.pools["older"].allocating && !a.pools["newer"].allocating);
        assert_eq!(a.pools["older"].overlaps, ["newer"]);
        assert_eq!(a.pools["newer"].overlaps, ["older"]);
    }

    #[test]
    fn a_disabled_older_pool_still_blocks_an_overlapping_newer_one() {
        let mut older = mk_pool("older", "10.244.0.0/16", 24, 1);
        older.disabled = true;
        let pools = [older, mk_pool("newer", "10.244.0.0/17", 24, 2)];
        let a = allocate(&pools, &[mk_node("a", &[])], &[]);
        assert!(a.nodes["a"].blocks.is_empty());
        assert!(matches!(
            a.nodes["a"].problems[..],
            [Problem::NoAllocatablePool { .. }]
        ));
    }

    #[test]
    fn disabled_and_deleting_pools_keep_old_blocks_and_give_no_new_ones() {
        for flip in [
            |p: &mut Pool| p.disabled = true,
            |p: &mut Pool| p.deleting = true,
        ] {
            let mut pool = mk_pool("p", "10.244.0.0/16", 24, 0);
            let before = allocate(std::slice::from_ref(&pool), &[mk_node("a", &[])], &[]);
            flip(&mut pool);
            let after = allocate(
                &[pool],
                &[mk_node("a", &[]), mk_node("b", &[])],
                &before.held(),
            );
            assert_eq!(blocks(&after, "a"), ["10.244.0.0/24"]);
            assert!(after.nodes["b"].blocks.is_empty());
            assert_eq!(after.pools["p"].used, 1, "the finalizer must stay");
        }
    }

    #[test]
    fn conflicting_records_keep_one_holder_and_report_the_other() {
        let pools = [mk_pool("p", "10.244.0.0/16", 24, 0)];
        let record = [
            Held {
                node: "b".into(),
                blocks: vec![net("10.244.7.0/24")],
            },
            Held {
                node: "a".into(),
                blocks: vec![net("10.244.7.0/24")],
            },
        ];
        let a = allocate(&pools, &[mk_node("a", &[]), mk_node("b", &[])], &record);
        assert_eq!(blocks(&a, "a"), ["10.244.7.0/24"]);
        assert_eq!(blocks(&a, "b"), ["10.244.0.0/24"], "b gets a fresh block");
        assert_eq!(
            a.nodes["b"].problems,
            [Problem::Conflict {
                block: net("10.244.7.0/24"),
                holder: "a".into()
            }]
        );
    }

    #[test]
    fn a_recorded_block_outside_every_pool_stays() {
        let pools = [mk_pool("p", "10.244.0.0/16", 24, 0)];
        let record = [Held {
            node: "a".into(),
            blocks: vec![net("192.168.5.0/24")],
        }];
        let a = allocate(&pools, &[mk_node("a", &[])], &record);
        assert_eq!(blocks(&a, "a"), ["192.168.5.0/24"]);
        assert_eq!(a.pools["p"].used, 0);
    }

    #[test]
    fn free_space_is_found_past_irregular_held_ranges() {
        // A hand-made /22 record in a pool of /24 blocks: the cursor jumps past it.
        let pools = [mk_pool("p", "10.0.0.0/16", 24, 0)];
        let record = [Held {
            node: "a".into(),
            blocks: vec![net("10.0.0.0/22")],
        }];
        let a = allocate(&pools, &[mk_node("a", &[]), mk_node("b", &[])], &record);
        assert_eq!(blocks(&a, "b"), ["10.0.4.0/24"]);
    }

    #[test]
    fn block_counts_saturate() {
        assert_eq!(block_count(&net("10.0.0.0/8"), 24), 65536);
        assert_eq!(block_count(&net("10.0.0.0/24"), 16), 0);
        assert_eq!(block_count(&net("::/0"), 128), u128::MAX);
    }
}
