//! Criterion benchmarks of the pure IPAM core at the scale target: 5,000
//! nodes taking /24 blocks from 10.0.0.0/8.
//!
//! ```text
//! cargo bench -p trellis-operator --bench ipam
//! ```
//!
//! Every input is built once, outside the timed closure; the timed closure is
//! one call (`ipam::allocate` or `plan::plan`) including the drop of its
//! result, as a reconcile pass pays it. Peak memory is measured separately by
//! `examples/ipam_memory.rs` (criterion measures time only).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use trellis_operator::ipam::{Allocation, allocate};
use trellis_operator::plan::plan;

mod support;

/// The machine is shared (two cores, other work running): modest times.
fn group<'a>(c: &'a mut Criterion, name: &str, n: usize) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .sample_size(40)
        .throughput(Throughput::Elements(n as u64));
    g
}

/// 5,000 (or 500) nodes, nothing recorded yet: every node gets a block.
fn fresh(c: &mut Criterion) {
    let pools = support::v4_pools();
    for n in [500, 5_000] {
        let nodes = support::ipam_nodes(n);
        let once = allocate(&pools, &nodes, &[]);
        assert!(once.nodes.values().all(|b| b.blocks.len() == 1));
        assert_eq!(once.pools["default-ipv4"].used, n as u128);
        let mut g = group(c, "fresh", n);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| allocate(black_box(&pools), black_box(&nodes), black_box(&[])));
        });
        g.finish();
    }
}

/// A stable cluster: the record is the fresh result, so every pass changes
/// nothing. This is what each reconcile pass costs in the common case.
fn steady(c: &mut Criterion) {
    let pools = support::v4_pools();
    for n in [500, 5_000] {
        let nodes = support::ipam_nodes(n);
        let fresh: Allocation = allocate(&pools, &nodes, &[]);
        let record = fresh.held();
        assert_eq!(
            allocate(&pools, &nodes, &record),
            fresh,
            "the record is a fixpoint"
        );
        let mut g = group(c, "steady", n);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| allocate(black_box(&pools), black_box(&nodes), black_box(&record)));
        });
        g.finish();
    }
}

/// 4,999 nodes recorded, one joins. The recorded blocks are the lowest
/// 4,999, so the new node's block is found past all of them (the cursor walks
/// every held range once: the worst case for one join).
fn join(c: &mut Criterion) {
    let n = 5_000;
    let pools = support::v4_pools();
    let nodes = support::ipam_nodes(n);
    let before = allocate(&pools, &nodes[..n - 1], &[]);
    let record = before.held();
    let after = allocate(&pools, &nodes, &record);
    let newcomer = support::node_name(n - 1);
    assert_eq!(
        after.nodes[&newcomer].blocks,
        ["10.19.135.0/24".parse().expect("a /24")],
        "block 4,999 of the /8"
    );
    assert!(
        before
            .nodes
            .iter()
            .all(|(name, b)| after.nodes[name].blocks == b.blocks),
        "recorded blocks never move"
    );
    let mut g = group(c, "join", n);
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| allocate(black_box(&pools), black_box(&nodes), black_box(&record)));
    });
    g.finish();
}

/// Dual-stack: the IPv4 pool plus fd00::/48 with /120 blocks; every node gets
/// one block of each family.
fn fresh_dual(c: &mut Criterion) {
    let n = 5_000;
    let pools = support::dual_pools();
    let nodes = support::ipam_nodes(n);
    let once = allocate(&pools, &nodes, &[]);
    assert!(once.nodes.values().all(|b| b.blocks.len() == 2));
    let mut g = group(c, "fresh_dual", n);
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| allocate(black_box(&pools), black_box(&nodes), black_box(&[])));
    });
    g.finish();
}

/// The whole pure pass on a steady cluster: 5,000 Nodes, one IPPool, 5,000
/// matching NodeNetworks with statuses. Nothing to write.
fn plan_steady(c: &mut Criterion) {
    let n = 5_000;
    let snapshot = support::steady_snapshot(n);
    let now = support::time("2026-01-01T01:00:00Z");
    assert_eq!(snapshot.node_networks.len(), n);
    let once = plan(&snapshot, &now);
    assert_eq!(once.writes(), 0, "a steady cluster writes nothing");
    assert_eq!(once.blocks_in_use, n as u128);
    let mut g = group(c, "plan", n);
    g.sample_size(20);
    g.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| plan(black_box(&snapshot), black_box(&now)));
    });
    g.finish();
}

criterion_group!(benches, fresh, steady, join, fresh_dual, plan_steady);
criterion_main!(benches);
