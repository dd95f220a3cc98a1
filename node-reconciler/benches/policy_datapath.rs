//! Per-packet cost of the policy programs, and how it depends on the size
//! of the endpoint's policy table: (a) 10 entries against (b) 65,536, both
//! with 100,000 IP cache entries. The design target is (b)/(a) ≤ 1.10
//! (docs/design/0004-policy-datapath.md: hash lookups, not a scan).
//!
//! ```text
//!  netns trellis-bench-dp: veth trellisbench0 (stands in for a pod's host veth)
//!   └─ thread inside it: per mask, 3 unpinned loads of the programs, each with its own maps
//!        IP cache  100,000 prefixes: /32 pods over 10,000 identities + 1,000 CIDRs (same in all)
//!        policy    (a) 10 entries | (a') 10 entries again (the control) | (b) 65,536 entries;
//!                  one table, both directions isolated
//!        mask      "ports": port prefix length 16 only      (a full miss: 3 hash lookups)
//!                  "full":  lengths 0–16 + any-protocol     (a full miss: 54 hash lookups)
//!   BPF_PROG_TEST_RUN of trellis_from_pod / trellis_to_pod on one TCP frame:
//!        denied       no entry for the peer: every length of every identity looked up, drop
//!                     (repeat N in the kernel: nothing changes between repeats)
//!        allowed-new  the peer's exact-port allow entry, a new connection: lookup + conntrack
//!                     entry created; one run per call, the entry removed between calls
//!                     (an allowed run creates it, so repeats would measure `established`)
//!        denied-1     the denied frame one run per call: the same per-call overhead as
//!                     allowed-new, to compare the two
//!        established  the connection's next packet (ACK): conntrack hit (repeat N)
//!  each run takes every measurement on the three loads back to back (the order rotating and
//!  reversing); medians over runs; ratio (b)/(a), and (a')/(a): what two loads of the same
//!  table differ by on this machine at this time (noise, memory placement)
//! ```
//!
//! Times are the kernel's own per-run mean (`BPF_PROG_TEST_RUN`'s duration:
//! the program plus some 25 ns of harness, no syscall). Both tables use the
//! same prefix-length mask, so both do the same lookups and differ only in
//! how many entries the hash holds; with 10 entries a table cannot have all
//! 18 lengths, so in "full" (a)'s mask names lengths it has no entries for,
//! which costs exactly the lookups (b)'s does. The frame is the same on
//! every repeat, so its entries stay in cache: this measures the lookup
//! path, not the cache misses of real traffic spread over many peers.
//!
//! Needs root (it makes a network namespace and loads BPF programs):
//!
//!   cargo bench -p trellis-node --bench policy_datapath -- [--runs 9] [--repeat 200000]
//!       [--calls 3000] [--ipcache 100000] [--small 10] [--large 65536] [--masks ports,full]
//!
//! Run directly, the binary needs `--bench` too (what `cargo bench` passes); without it,
//! as `cargo test --benches` runs it, it does nothing.
//!
//! `scripts/bench-policy.sh datapath` runs it. The last lines are
//! `RESULT key=value …`, one per (mask, program, packet), for the script.

#[allow(dead_code, reason = "the test fixture has more than the bench needs")]
#[path = "../tests/fixtures/netns.rs"]
mod netns;
#[allow(dead_code, reason = "the test fixture has more than the bench needs")]
#[path = "../tests/fixtures/packet.rs"]
mod packet;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use netns::Netns;
use packet::{Ip, L4, TCP_ACK, TCP_SYN};
use trellis_node::bpf::abi::{
    CtKey, Direction, EndpointEntry, ID_FIRST_CIDR, ID_FIRST_POD, IpCacheEntry, PLEN_MAX,
    PLENS_ANY_PROTO, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyEntry, PolicyKey, Reason, plen_bit,
};
use trellis_node::bpf::{Datapath, Program, Verdict};

/// The endpoint's own address and identity.
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 10);
const ID_LOCAL: u32 = 300_000;
/// Pod identities in the IP cache: `ID_FIRST_POD ..` this many.
const IDENTITIES: u32 = 10_000;
/// The peer whose exact port the table allows, and the one it has nothing for.
const ID_ALLOWED: u32 = ID_FIRST_POD + 4_242;
const ID_DENIED: u32 = ID_FIRST_POD + 7_777;
/// Pod slots (index into the generated pod addresses) of those two peers.
const SLOT_ALLOWED: u32 = 50_000;
const SLOT_DENIED: u32 = 77_777;
/// CIDR prefixes in the IP cache (of the requested total).
const CIDRS: u32 = 1_000;
const PORT: u16 = 8080;
const TABLE: u32 = 1;
const VETH: &str = "trellisbench0";

#[derive(Debug, Clone)]
struct Options {
    runs: usize,
    repeat: u32,
    calls: usize,
    ipcache: u32,
    small: usize,
    large: usize,
    masks: Vec<Mask>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mask {
    Ports,
    Full,
}

impl Mask {
    fn name(self) -> &'static str {
        match self {
            Mask::Ports => "ports",
            Mask::Full => "full",
        }
    }

    fn bits(self) -> u32 {
        match self {
            Mask::Ports => plen_bit(PLEN_MAX),
            Mask::Full => (0..=PLEN_MAX).fold(PLENS_ANY_PROTO, |m, n| m | plen_bit(n)),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mask::Ports => "exact ports only (port prefix length 16): a full miss is 3 lookups",
            Mask::Full => {
                "every port prefix length 0-16 and any-protocol: a full miss is 54 lookups"
            }
        }
    }
}

fn parse_args() -> Options {
    let mut o = Options {
        runs: 9,
        repeat: 200_000,
        calls: 3_000,
        ipcache: 100_000,
        small: 10,
        large: 65_536,
        masks: vec![Mask::Ports, Mask::Full],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            "--runs" => o.runs = value("--runs").parse().expect("--runs N"),
            "--repeat" => o.repeat = value("--repeat").parse().expect("--repeat N"),
            "--calls" => o.calls = value("--calls").parse().expect("--calls N"),
            "--ipcache" => o.ipcache = value("--ipcache").parse().expect("--ipcache N"),
            "--small" => o.small = value("--small").parse().expect("--small N"),
            "--large" => o.large = value("--large").parse().expect("--large N"),
            "--masks" => {
                o.masks = value("--masks")
                    .split(',')
                    .map(|m| match m {
                        "ports" => Mask::Ports,
                        "full" => Mask::Full,
                        other => panic!("unknown mask {other:?} (ports, full)"),
                    })
                    .collect();
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    assert!(o.runs >= 1 && o.repeat >= 1 && o.calls >= 1, "{o:?}");
    assert!(o.ipcache > CIDRS + SLOT_DENIED, "--ipcache too small");
    assert!(o.small >= 1 && o.large >= o.small, "{o:?}");
    o
}

/// splitmix64: the same tables on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Pod slot `i`: node `i / 100` of a 10.0.0.0/14 pod network with /24
/// blocks, pod `i % 100` in its block.
fn pod_addr(i: u32) -> Ipv4Addr {
    let node = i / 100;
    let octets = [
        10,
        u8::try_from(node / 256).expect("fits"),
        u8::try_from(node % 256).expect("fits"),
        u8::try_from(2 + i % 100).expect("fits"),
    ];
    Ipv4Addr::from(octets)
}

/// The IP cache: `CIDRS` prefixes (10.0.0.0/8, the four /16s of the pod
/// network, the rest /24s of 172.16.0.0/12), then /32 pods spread over
/// `IDENTITIES` identities, each carrying the CIDR identity of its /16.
fn ipcache(total: u32) -> Vec<(IpNet, IpCacheEntry)> {
    let mut out = Vec::new();
    let cidr = |addr: Ipv4Addr, len: u8| IpNet::V4(Ipv4Net::new(addr, len).expect("prefix"));
    out.push((
        cidr(Ipv4Addr::new(10, 0, 0, 0), 8),
        IpCacheEntry {
            identity: 2,
            cidr_identity: ID_FIRST_CIDR,
        },
    ));
    for k in 0..4u8 {
        out.push((
            cidr(Ipv4Addr::new(10, k, 0, 0), 16),
            IpCacheEntry {
                identity: 2,
                cidr_identity: ID_FIRST_CIDR + 1 + u32::from(k),
            },
        ));
    }
    for k in 0..CIDRS - 5 {
        let addr = Ipv4Addr::new(
            172,
            u8::try_from(16 + k / 256).expect("fits"),
            u8::try_from(k % 256).expect("fits"),
            0,
        );
        out.push((
            cidr(addr, 24),
            IpCacheEntry {
                identity: 2,
                cidr_identity: ID_FIRST_CIDR + 5 + k,
            },
        ));
    }
    let mut rng = Rng(1);
    // The endpoint's own address is the last entry.
    for i in 0..total - CIDRS - 1 {
        let addr = pod_addr(i);
        let identity = match i {
            SLOT_ALLOWED => ID_ALLOWED,
            SLOT_DENIED => ID_DENIED,
            _ => ID_FIRST_POD + u32::try_from(rng.below(u64::from(IDENTITIES))).expect("fits"),
        };
        let cidr_identity = ID_FIRST_CIDR + 1 + u32::from(addr.octets()[1]);
        out.push((
            IpNet::from(IpAddr::V4(addr)),
            IpCacheEntry {
                identity,
                cidr_identity,
            },
        ));
    }
    out.push((
        IpNet::from(IpAddr::V4(LOCAL)),
        IpCacheEntry {
            identity: ID_LOCAL,
            cidr_identity: 2,
        },
    ));
    out
}

/// The allow entry the allowed frame matches, then `n - 1` more entries of
/// other identities (pods and the /24 CIDRs, never the two peers' own, ANY,
/// or the /16s and /8 their CIDR identities name): the same sequence for
/// every size, so the small table is the first entries of the large one.
fn table(mask: Mask, n: usize) -> Vec<(PolicyKey, PolicyEntry)> {
    let allow = PolicyKey::ports(TABLE, ID_ALLOWED, PROTO_TCP, PORT, PLEN_MAX);
    let mut seen = BTreeSet::from([allow]);
    let mut out = vec![(allow, PolicyEntry::allow(0))];
    let mut rng = Rng(2);
    let mut rule = 1;
    while out.len() < n {
        let identity = if rng.below(4) == 0 {
            ID_FIRST_CIDR + 5 + u32::try_from(rng.below(u64::from(CIDRS - 5))).expect("fits")
        } else {
            ID_FIRST_POD + u32::try_from(rng.below(u64::from(IDENTITIES))).expect("fits")
        };
        if identity == ID_ALLOWED || identity == ID_DENIED {
            continue;
        }
        let proto = [PROTO_TCP, PROTO_UDP, PROTO_SCTP][usize::try_from(rng.below(3)).expect("<3")];
        let port = u16::try_from(rng.below(65_536)).expect("fits");
        let key = match mask {
            Mask::Ports => PolicyKey::ports(TABLE, identity, proto, port, PLEN_MAX),
            Mask::Full => match u8::try_from(rng.below(18)).expect("fits") {
                17 => PolicyKey::any_protocol(TABLE, identity),
                plen => PolicyKey::ports(TABLE, identity, proto, port, plen),
            },
        };
        if seen.insert(key) {
            out.push((key, PolicyEntry::allow(rule)));
            rule += 1;
        }
    }
    out
}

/// One loaded copy of the programs with its own maps, set up for one
/// (mask, table size).
struct Setup {
    label: String,
    dp: Datapath,
}

fn load(
    ifindex: u32,
    mask: Mask,
    size: usize,
    cache: &[(IpNet, IpCacheEntry)],
    entries: &[(PolicyKey, PolicyEntry)],
) -> Setup {
    let mut dp = Datapath::load(None).expect("load the programs (root, BPF)");
    for (net, entry) in cache {
        dp.set_ipcache(*net, *entry).expect("IP cache entry");
    }
    for (k, v) in &entries[..size] {
        dp.set_policy(*k, *v).expect("policy entry");
    }
    let entry = EndpointEntry::new(ID_LOCAL)
        .isolate(Direction::Ingress, TABLE, mask.bits())
        .isolate(Direction::Egress, TABLE, mask.bits());
    dp.set_endpoint(ifindex, &entry).expect("endpoint");
    assert_eq!(dp.policy_entries().expect("dump").len(), size);
    Setup {
        label: format!("{} {size}", mask.name()),
        dp,
    }
}

/// The frames of one program: from the pod to the peer (egress policy) or
/// from the peer to the pod (ingress policy).
struct Frames {
    denied: Vec<u8>,
    allowed: Vec<u8>,
    established: Vec<u8>,
    /// The connection entry the allowed frame creates.
    ct: CtKey,
}

fn frames(program: Program, ifindex: u32) -> Frames {
    let local = IpAddr::V4(LOCAL);
    let denied_peer = IpAddr::V4(pod_addr(SLOT_DENIED));
    let allowed_peer = IpAddr::V4(pod_addr(SLOT_ALLOWED));
    let (sport, dport) = (40_000, PORT);
    let make = |peer: IpAddr, flags: u8| {
        let l4 = L4::tcp(sport, dport, flags);
        match program {
            Program::FromPod => Ip::new(local, peer, l4).frame(),
            Program::ToPod => Ip::new(peer, local, l4).frame(),
        }
    };
    let (saddr, daddr) = match program {
        Program::FromPod => (local, allowed_peer),
        Program::ToPod => (allowed_peer, local),
    };
    Frames {
        denied: make(denied_peer, TCP_SYN),
        allowed: make(allowed_peer, TCP_SYN),
        established: make(allowed_peer, TCP_ACK),
        ct: CtKey {
            endpoint: ifindex,
            dir: program.direction(),
            proto: PROTO_TCP,
            sport,
            dport,
            saddr,
            daddr,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Denied,
    AllowedNew,
    DeniedOne,
    Established,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Denied,
        Kind::AllowedNew,
        Kind::DeniedOne,
        Kind::Established,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Denied => "denied",
            Kind::AllowedNew => "allowed-new",
            Kind::DeniedOne => "denied-1",
            Kind::Established => "established",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Denied => "denied after the full lookup (repeat in the kernel)",
            Kind::AllowedNew => "allowed, new connection (1 run per call, entry removed between)",
            Kind::DeniedOne => "denied, 1 run per call (per-call baseline of allowed-new)",
            Kind::Established => "established connection (repeat in the kernel)",
        }
    }
}

fn nanos(d: std::time::Duration) -> f64 {
    // Whole nanoseconds from the kernel: exact in an f64.
    d.as_secs_f64() * 1e9
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The kernel's mean time per run of `frame`, `repeat` runs in one call.
fn in_kernel(
    dp: &Datapath,
    program: Program,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
    want: Verdict,
) -> f64 {
    let (verdict, took) = dp
        .test_run_repeat(program, ifindex, frame, repeat)
        .expect("test run");
    assert_eq!(verdict, want, "{program:?}");
    nanos(took)
}

/// The median of `calls` single runs; `fresh`: the connection entry is
/// removed before each, so each run is the first packet of a connection.
fn per_call(
    dp: &mut Datapath,
    program: Program,
    ifindex: u32,
    frame: &[u8],
    calls: usize,
    want: Verdict,
    fresh: Option<&CtKey>,
) -> f64 {
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        if let Some(key) = fresh {
            dp.remove_conntrack(key).expect("remove the connection");
        }
        times.push(in_kernel(dp, program, ifindex, frame, 1, want));
    }
    median(&times)
}

fn measure(
    s: &mut Setup,
    program: Program,
    f: &Frames,
    kind: Kind,
    ifindex: u32,
    o: &Options,
) -> f64 {
    let dp = &mut s.dp;
    match kind {
        Kind::Denied => in_kernel(dp, program, ifindex, &f.denied, o.repeat, Verdict::Drop),
        Kind::DeniedOne => per_call(
            dp,
            program,
            ifindex,
            &f.denied,
            o.calls,
            Verdict::Drop,
            None,
        ),
        Kind::AllowedNew => per_call(
            dp,
            program,
            ifindex,
            &f.allowed,
            o.calls,
            Verdict::Pass,
            Some(&f.ct),
        ),
        Kind::Established => {
            // The connection exists (the allowed frame made it, again if
            // something removed it).
            in_kernel(dp, program, ifindex, &f.allowed, 1, Verdict::Pass);
            in_kernel(
                dp,
                program,
                ifindex,
                &f.established,
                o.repeat,
                Verdict::Pass,
            )
        }
    }
}

/// Each frame once, checking it took the path it is meant to measure.
fn check_paths(s: &mut Setup, program: Program, f: &Frames, ifindex: u32) {
    let dir = program.direction();
    let dp = &mut s.dp;
    dp.remove_conntrack(&f.ct).expect("remove");
    for (frame, reason) in [
        (&f.denied, Reason::NoMatch),
        (&f.allowed, Reason::PolicyAllow),
        (&f.established, Reason::Established),
    ] {
        let before = dp.counters().expect("counters");
        dp.test_run(program, ifindex, frame).expect("test run");
        let moved = dp.counters().expect("counters").since(&before).nonzero();
        assert_eq!(moved, vec![(reason, dir, 1)], "{} {program:?}", s.label);
    }
}

struct Row {
    mask: Mask,
    program: Program,
    kind: Kind,
    /// Per run, for (a) the small table, (a') a second load of the small table (the
    /// control: what two loads of the same thing differ by), (b) the large table.
    times: [Vec<f64>; 3],
}

impl Row {
    fn median(&self, setup: usize) -> f64 {
        median(&self.times[setup])
    }

    /// `setup` / (a) per run: (min, max).
    fn spread(&self, setup: usize) -> (f64, f64) {
        let r: Vec<f64> = self.times[0]
            .iter()
            .zip(&self.times[setup])
            .map(|(a, x)| x / a)
            .collect();
        (
            r.iter().copied().fold(f64::INFINITY, f64::min),
            r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` (or --all-targets) runs bench
    // binaries without it, as tests, and this one needs root and a minute.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("policy_datapath: a benchmark; run it with `cargo bench` (as root)");
        return;
    }
    let o = parse_args();
    let ns = Netns::new("trellis-bench-dp".to_owned());
    ns.ip(&[
        "link",
        "add",
        VETH,
        "type",
        "veth",
        "peer",
        "name",
        &format!("{VETH}p"),
    ]);
    let ifindex = ns.ifindex(VETH);
    let rows = ns.enter(|| run(&o, ifindex));
    report(&o, &rows);
}

fn run(o: &Options, ifindex: u32) -> Vec<Row> {
    let cache = ipcache(o.ipcache);
    eprintln!(
        "IP cache: {} prefixes ({CIDRS} CIDRs, the rest /32 pods over {IDENTITIES} identities)",
        cache.len()
    );
    let mut rows = Vec::new();
    for &mask in &o.masks {
        let entries = table(mask, o.large);
        let started = std::time::Instant::now();
        let mut setups = [
            load(ifindex, mask, o.small, &cache, &entries),
            load(ifindex, mask, o.small, &cache, &entries),
            load(ifindex, mask, o.large, &cache, &entries),
        ];
        eprintln!(
            "mask {}: loaded (a) {} entries, (a') the same again and (b) {} entries in {:.1}s",
            mask.name(),
            o.small,
            o.large,
            started.elapsed().as_secs_f64()
        );
        let first = rows.len();
        for program in Program::ALL {
            let f = frames(program, ifindex);
            for setup in &mut setups {
                check_paths(setup, program, &f, ifindex);
                // Untimed, to warm each path once.
                for kind in Kind::ALL {
                    measure(setup, program, &f, kind, ifindex, o);
                }
            }
            for kind in Kind::ALL {
                rows.push(Row {
                    mask,
                    program,
                    kind,
                    times: [Vec::new(), Vec::new(), Vec::new()],
                });
            }
        }
        for r in 0..o.runs {
            // Each measurement is taken on the three loads back to back, in an order that
            // rotates and reverses from one to the next, so drift in the machine's speed
            // falls on all three alike.
            for (k, row) in rows[first..].iter_mut().enumerate() {
                let f = frames(row.program, ifindex);
                let turn = r * rows_per_mask() + k;
                let mut order = [turn % 3, (turn + 1) % 3, (turn + 2) % 3];
                if turn % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let took = measure(&mut setups[i], row.program, &f, row.kind, ifindex, o);
                    row.times[i].push(took);
                }
            }
            eprintln!("mask {}: run {} of {} done", mask.name(), r + 1, o.runs);
        }
    }
    rows
}

/// Rows of one mask: programs × packets.
const fn rows_per_mask() -> usize {
    Program::ALL.len() * Kind::ALL.len()
}

fn report(o: &Options, rows: &[Row]) {
    println!();
    println!(
        "Per-packet time (the kernel's BPF_PROG_TEST_RUN duration), median of {} runs; IP \
         cache {} prefixes; (a) {} policy entries, (a') the same loaded again (control), (b) {}",
        o.runs, o.ipcache, o.small, o.large
    );
    for &mask in &o.masks {
        println!();
        println!("mask {}: {}", mask.name(), mask.describe());
        println!(
            "| program | packet | (a) {} entries | (b) {} entries | ratio (b)/(a) | per run | \
             control (a')/(a) | per run |",
            o.small, o.large
        );
        println!("|---|---|---|---|---|---|---|---|");
        for row in rows.iter().filter(|r| r.mask == mask) {
            let (a, control, b) = (row.median(0), row.median(1), row.median(2));
            let (blo, bhi) = row.spread(2);
            let (clo, chi) = row.spread(1);
            println!(
                "| {} | {} | {a:.0} ns | {b:.0} ns | {:.3}x | {blo:.2}–{bhi:.2} | {:.3}x | \
                 {clo:.2}–{chi:.2} |",
                row.program.name(),
                row.kind.name(),
                b / a,
                control / a,
            );
        }
    }
    println!();
    for kind in Kind::ALL {
        println!("{:<12} {}", kind.name(), kind.describe());
    }
    println!();
    for row in rows {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let (a, control, b) = (row.median(0), row.median(1), row.median(2));
        println!(
            "RESULT mask={} program={} packet={} small={} large={} a_ns={a:.1} b_ns={b:.1} \
             ratio={:.3} control={:.3} {}",
            row.mask.name(),
            row.program.name(),
            row.kind.name(),
            o.small,
            o.large,
            b / a,
            control / a,
            ["a_runs", "control_runs", "b_runs"]
                .iter()
                .zip(&row.times)
                .map(|(key, times)| format!("{key}={}", fmt(times)))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}
