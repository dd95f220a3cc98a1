//! What a policy sync costs a node when one pod starts on another node, in
//! a cluster of 10,000 and of 150,000 pods (110 per node, 500 identities,
//! 20 local endpoints): ARCHITECTURE's "reconcile cost is proportional to
//! what changed, not to the cluster".
//!
//! - `from_scratch/N`: the sync as it was computed before the IP cache was
//!   kept incrementally (and as `desired::desired` still defines it): read
//!   every shard, rebuild the identities' named ports and the pod networks,
//!   compute the whole IP cache, diff all of it against the mirror.
//! - `incremental/N`: the engine's sync now: read the one changed shard,
//!   replace its claims in the `IpCacheIndex`, plan the touched keys.
//!
//! Both compute the endpoints' tables the same way (from the compile
//! cache) and plan against a converged mirror. Each iteration adds or
//! removes one pod of one shard, alternately.
//!
//!   cargo bench -p trellis-node --bench policy_sync

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use trellis_api::v1alpha1::{IPPool, NodeEndpoints, NodeEndpointsSpec, PodEndpoint};
use trellis_node::policy::desired::{
    Claim, Claimant, CompileCache, Local, World, desired_cached, desired_tables, local_claims,
};
use trellis_node::policy::ipcache::{IpCacheIndex, Source};
use trellis_node::policy::shards::{NamedIndex, shard_claims};
use trellis_node::policy::sync::{Installed, IpCachePlan, MapOp, plan, plan_with};
use trellis_node::policy::testing::{ip, mk_identity, mk_input_with, mk_local, mk_policies};
use trellis_policy::cluster::{pod_networks, pool_networks, read_shards, with_named_ports};
use trellis_policy::identity::{HOST, IdentityInfo};

const PER_NODE: usize = 110;
const IDENTITIES: u32 = 500;
const LOCALS: u32 = 20;

fn pod_address(i: usize) -> String {
    format!("10.{}.{}.{}", 128 + (i >> 16), (i >> 8) & 255, i & 255)
}

/// Node `n`'s shard with pods `first..first + count` (global numbering).
fn shard(n: usize, first: usize, count: usize) -> NodeEndpoints {
    let endpoints = (first..first + count)
        .map(|i| PodEndpoint {
            namespace: format!("ns{}", i % 50),
            name: format!("pod-{i}"),
            addresses: vec![pod_address(i)],
            identity: i32::try_from(1000 + i % IDENTITIES as usize).expect("a small id"),
            named_ports: Vec::new(),
        })
        .collect();
    let mut s = NodeEndpoints::new(&format!("node-{n}"), NodeEndpointsSpec { endpoints });
    s.metadata.resource_version = Some(format!("{n}-{count}"));
    s
}

fn pool() -> IPPool {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "network.trellis.dev/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": "default"},
        "spec": {"cidr": "10.0.0.0/8", "blockSize": 24},
    }))
    .expect("an IPPool")
}

fn mirror(want: &BTreeMap<ipnet::IpNet, trellis_node::bpf::abi::IpCacheEntry>) -> Installed {
    Installed {
        ipcache: want.clone(),
        ..Installed::default()
    }
}

fn write(installed: &mut Installed, ops: &[MapOp]) {
    for op in ops {
        match op {
            MapOp::SetIpCache { net, entry } => {
                installed.ipcache.insert(*net, *entry);
            }
            MapOp::RemoveIpCache { net } => {
                installed.ipcache.remove(net);
            }
            _ => {}
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_sync_remote_pod");
    let identities: Vec<IdentityInfo> = (0..IDENTITIES)
        .map(|i| mk_identity(1000 + i, &format!("ns{}", i % 50), &format!("app{i}")))
        .collect();
    let input = mk_input_with(mk_policies(80), identities.clone());
    let locals: Vec<Local> = (0..LOCALS)
        .map(|i| {
            let addr = format!("10.0.0.{}", 10 + i);
            mk_local(
                100 + i,
                1000 + i,
                &format!("ns{}", i % 50),
                &format!("app{i}"),
                &[&addr],
            )
        })
        .collect();
    let host = [ip("192.0.2.11")];
    let pools = [pool()];
    let nets = pool_networks(&pools);

    for pods in [10_000usize, 150_000] {
        let nodes = pods / PER_NODE;
        let mut shards: Vec<NodeEndpoints> = (0..nodes)
            .map(|n| shard(n, n * PER_NODE, PER_NODE))
            .collect();
        // The shard that changes: node 0 with one pod more or less.
        let variants = [shard(0, 0, PER_NODE + 1), shard(0, 0, PER_NODE)];

        // From scratch, as every sync did.
        let mut cache = CompileCache::default();
        let mut input = input.clone();
        let mut sync_from_scratch = |shards: &[NodeEndpoints], installed: &Installed| {
            let read = read_shards(shards);
            let remote: Vec<(IpAddr, u32)> = read
                .addresses
                .iter()
                .map(|a| (a.address, a.identity))
                .collect();
            input.identities = with_named_ports(&identities, &read.named);
            input.pod_networks = pod_networks(
                &pools,
                remote
                    .iter()
                    .map(|(a, _)| *a)
                    .chain(locals.iter().flat_map(|l| l.addresses.iter().copied())),
            );
            cache.for_input(1, &input.identities);
            let world = World {
                input: &input,
                locals: &locals,
                remote: &remote,
                host: &host,
            };
            let want = desired_cached(&world, &installed.ids(), &mut cache);
            plan(&want, installed)
        };
        shards[0] = variants[1].clone();
        let converged = {
            let ops = sync_from_scratch(&shards, &Installed::default());
            let mut m = Installed::default();
            write(&mut m, &ops);
            m
        };
        let mut flip = 0usize;
        group.bench_function(format!("from_scratch/{pods}"), |b| {
            b.iter(|| {
                flip ^= 1;
                shards[0] = variants[flip].clone();
                black_box(sync_from_scratch(black_box(&shards), &converged))
            })
        });

        // Incremental, as the engine does now.
        let mut input = input.clone();
        let mut index = IpCacheIndex::new();
        let mut named = NamedIndex::new();
        for s in &shards {
            let (claims, n) = shard_claims(s);
            let name = s.metadata.name.clone().unwrap_or_default();
            named.set_shard(&name, n);
            index.set_source(Source::Shard(name), claims);
        }
        index.set_cidrs(&input.cidrs);
        index.set_pod_nets(nets.clone());
        input.identities = with_named_ports(&identities, &named.named());
        input.pod_networks = index.pod_networks();
        let mut cache = CompileCache::default();
        cache.for_input(1, &input.identities);
        let host_claim = Claim {
            by: Claimant::Host,
            identity: HOST,
        };
        let mut installed = mirror(index.want());
        index.take_touched();
        let revision = named.revision();
        let mut flip = 0usize;
        group.bench_function(format!("incremental/{pods}"), |b| {
            b.iter(|| {
                flip ^= 1;
                let changed = &variants[flip];
                let (claims, n) = shard_claims(changed);
                named.set_shard("node-0", n);
                index.set_source(Source::Shard("node-0".into()), claims);
                index.set_source(Source::Local, local_claims(&locals));
                index.set_source(
                    Source::Host,
                    host.iter().map(|a| (*a, host_claim)).collect(),
                );
                index.set_cidrs(&input.cidrs);
                index.set_pod_nets(nets.clone());
                input.pod_networks = index.pod_networks();
                assert_eq!(named.revision(), revision, "no named port moved");
                let want = desired_tables(&input, &locals, &installed.ids(), &mut cache);
                let touched = index.take_touched();
                let ops = plan_with(&want, IpCachePlan::Keys(index.want(), &touched), &installed);
                write(&mut installed, &ops);
                index.settle(&touched, &installed.ipcache);
                black_box(ops)
            })
        });
        assert_eq!(installed.ipcache, *index.want(), "the mirror kept up");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
