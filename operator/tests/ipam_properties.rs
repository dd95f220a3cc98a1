//! Property tests of block allocation: random sequences of node joins,
//! departures and relabels, pool creation, disabling and deletion, and
//! operator restarts; after every step every invariant of the IPAM contract
//! holds. The model plays the controller shell: it writes each live node's
//! blocks back as the record (the `NodeNetwork`s) and removes a deleted pool
//! only once its finalizer may go (no block in use).

use std::collections::BTreeMap;

use ipnet::IpNet;
use proptest::prelude::*;
use trellis_api::v1alpha1::{LabelSelector, LabelSelectorRequirement, SelectorOperator};
use trellis_operator::ipam::{
    Allocation, Family, Held, Node, Pool, Problem, allocate, nets_overlap,
};
use trellis_policy::selector::Selector;

/// Small pools, several overlapping, so exhaustion and overlap happen often.
const POOLS: [(&str, u8); 7] = [
    ("10.0.0.0/22", 24),
    ("10.0.0.0/23", 24),
    ("10.0.2.0/24", 25),
    ("10.1.0.0/24", 24),
    ("10.2.0.0/23", 25),
    ("fd00::/120", 122),
    ("fd00::/121", 122),
];

#[derive(Debug, Clone)]
enum Op {
    AddNode { first_letter: u8, zone: u8 },
    RemoveNode(usize),
    Relabel(usize, u8),
    AddPool { which: usize, zone_only: Option<u8> },
    Disable(usize),
    Enable(usize),
    Delete(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..26, 0u8..2).prop_map(|(first_letter, zone)| Op::AddNode { first_letter, zone }),
        2 => any::<usize>().prop_map(Op::RemoveNode),
        1 => (any::<usize>(), 0u8..2).prop_map(|(i, z)| Op::Relabel(i, z)),
        2 => (0..POOLS.len(), proptest::option::of(0u8..2))
            .prop_map(|(which, zone_only)| Op::AddPool { which, zone_only }),
        1 => any::<usize>().prop_map(Op::Disable),
        1 => any::<usize>().prop_map(Op::Enable),
        1 => any::<usize>().prop_map(Op::Delete),
        1 => Just(Op::Restart),
    ]
}

fn zone_labels(zone: u8) -> BTreeMap<String, String> {
    [("zone".to_owned(), format!("z{zone}"))].into()
}

#[derive(Default)]
struct Cluster {
    pools: Vec<Pool>,
    nodes: Vec<Node>,
    record: Vec<Held>,
    clock: i64,
}

impl Cluster {
    fn apply(&mut self, op: &Op) {
        self.clock += 1;
        match *op {
            Op::AddNode { first_letter, zone } => {
                let name = format!("{}-{}", char::from(b'a' + first_letter), self.clock);
                self.nodes.push(Node {
                    name,
                    labels: zone_labels(zone),
                });
            }
            Op::RemoveNode(i) if !self.nodes.is_empty() => {
                let i = i % self.nodes.len();
                self.nodes.remove(i);
            }
            Op::Relabel(i, zone) if !self.nodes.is_empty() => {
                let i = i % self.nodes.len();
                self.nodes[i].labels = zone_labels(zone);
            }
            Op::AddPool { which, zone_only } => {
                let (cidr, block_prefix) = POOLS[which];
                let selector = match zone_only {
                    None => Selector::everything(),
                    Some(z) => Selector::from(&LabelSelector {
                        match_expressions: vec![LabelSelectorRequirement {
                            key: "zone".into(),
                            operator: SelectorOperator::In,
                            values: vec![format!("z{z}")],
                        }],
                        ..Default::default()
                    }),
                };
                self.pools.push(Pool {
                    name: format!("pool-{}", self.clock),
                    cidr: cidr.parse().expect("cidr"),
                    block_prefix,
                    selector,
                    disabled: false,
                    deleting: false,
                    created: self.clock,
                });
            }
            Op::Disable(i) | Op::Enable(i) | Op::Delete(i) if !self.pools.is_empty() => {
                let i = i % self.pools.len();
                match op {
                    Op::Disable(_) => self.pools[i].disabled = true,
                    Op::Enable(_) => self.pools[i].disabled = false,
                    _ => self.pools[i].deleting = true,
                }
            }
            _ => {}
        }
    }

    /// One reconcile, as the controller shell does it: allocate, write the
    /// record, release finalizers of deleting pools nothing uses.
    fn reconcile(&mut self) -> Allocation {
        let a = allocate(&self.pools, &self.nodes, &self.record);
        self.record = a.held();
        self.pools
            .retain(|p| !(p.deleting && a.pools[&p.name].used == 0));
        a
    }
}

fn check(c: &Cluster, before: &[Held], a: &Allocation) -> Result<(), TestCaseError> {
    let live: BTreeMap<&str, &Node> = c.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    prop_assert_eq!(
        a.nodes.keys().map(String::as_str).collect::<Vec<_>>(),
        live.keys().copied().collect::<Vec<_>>()
    );

    // No two nodes ever hold overlapping blocks.
    let all: Vec<(&str, &IpNet)> = a
        .nodes
        .iter()
        .flat_map(|(n, b)| b.blocks.iter().map(move |x| (n.as_str(), x)))
        .collect();
    for (i, (n1, b1)) in all.iter().enumerate() {
        for (n2, b2) in &all[i + 1..] {
            prop_assert!(!nets_overlap(b1, b2), "{n1} holds {b1}, {n2} holds {b2}");
        }
    }

    // A block held by a live node is never moved or reassigned.
    for held in before {
        if let Some(now) = a.nodes.get(&held.node) {
            for block in &held.blocks {
                prop_assert!(now.blocks.contains(block), "{} lost {block}", held.node);
            }
        }
    }

    // The record is a fixpoint: a restarted operator computes the same and writes nothing.
    prop_assert_eq!(&allocate(&c.pools, &c.nodes, &a.held()), a);

    for (name, node) in &a.nodes {
        let labels = &live[name.as_str()].labels;
        for family in [Family::V4, Family::V6] {
            let held: Vec<&IpNet> = node
                .blocks
                .iter()
                .filter(|b| Family::of(b) == family)
                .collect();
            prop_assert!(held.len() <= 1, "{name} holds {held:?}");
            let matching: Vec<&Pool> = c
                .pools
                .iter()
                .filter(|p| Family::of(&p.cidr) == family && p.selector.matches(labels))
                .collect();
            let allocating: Vec<&Pool> = matching
                .iter()
                .copied()
                .filter(|p| a.pools[&p.name].allocating)
                .collect();
            match held.first() {
                // A new block is a whole block of a pool that selects the node and gives out blocks.
                Some(block)
                    if !before
                        .iter()
                        .any(|h| h.node == *name && h.blocks.contains(block)) =>
                {
                    prop_assert!(
                        allocating.iter().any(
                            |p| p.cidr.contains(*block) && block.prefix_len() == p.block_prefix
                        ),
                        "{name} got {block}, which no allocating pool selecting it gives out"
                    );
                    prop_assert_eq!(block.trunc(), **block);
                }
                Some(_) => {}
                // No block: every pool that could give one is full, and the node says why.
                None if !matching.is_empty() => {
                    for p in &allocating {
                        let u = &a.pools[&p.name];
                        prop_assert_eq!(
                            u.used,
                            u.total,
                            "{} has room but {} got nothing",
                            p.name,
                            name
                        );
                    }
                    let explained = node.problems.iter().any(|pr| {
                        matches!(pr, Problem::PoolsExhausted { family: f, .. } | Problem::NoAllocatablePool { family: f, .. } if *f == family)
                    });
                    prop_assert!(
                        explained,
                        "{name} lacks a {family} block without a reason: {:?}",
                        node.problems
                    );
                }
                None => {}
            }
        }
    }

    // Overlapping pools: the newer one gives nothing, and both are flagged.
    for p in &c.pools {
        let u = &a.pools[&p.name];
        if p.disabled || p.deleting {
            prop_assert!(
                !u.allocating,
                "{} is disabled or deleting but allocates",
                p.name
            );
        }
        for q in &c.pools {
            if p.name != q.name && nets_overlap(&p.cidr, &q.cidr) {
                prop_assert!(
                    u.overlaps.contains(&q.name),
                    "{} does not flag {}",
                    p.name,
                    q.name
                );
                if (q.created, &q.name) < (p.created, &p.name) {
                    prop_assert!(
                        !u.allocating,
                        "{} is newer than overlapping {} but allocates",
                        p.name,
                        q.name
                    );
                    prop_assert!(u.yields_to.contains(&q.name));
                }
            }
        }
        // Usage counts exactly the held blocks inside the pool.
        let used = all.iter().filter(|(_, b)| p.cidr.contains(*b)).count() as u128;
        prop_assert_eq!(u.used, used);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..60)) {
        let mut cluster = Cluster::default();
        for op in &ops {
            cluster.apply(op);
            let before = cluster.record.clone();
            let pools = cluster.pools.clone();
            let a = cluster.reconcile();
            let view = Cluster { pools, nodes: cluster.nodes.clone(), record: Vec::new(), clock: 0 };
            check(&view, &before, &a)?;
        }
    }
}
