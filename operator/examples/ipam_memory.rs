//! Peak memory of the pure IPAM core at the scale target (5,000 nodes, /24
//! blocks from 10.0.0.0/8). Criterion measures time only; this measures
//! resident memory.
//!
//! ```text
//! cargo run --release -p trellis-operator --example ipam_memory
//! ```
//!
//! How, without a counting global allocator (that needs `unsafe impl
//! GlobalAlloc`, and the workspace forbids unsafe code):
//!
//! * Each scenario runs in its own child process (this binary, re-run with
//!   `--child SCENARIO N`), so scenarios cannot reuse each other's memory.
//! * Linux keeps the peak resident set size in `/proc/self/status` (`VmHWM`)
//!   and lets a process reset it to the current RSS by writing `5` to
//!   `/proc/self/clear_refs` (Linux ≥ 4.0). A phase's peak is `VmHWM` after
//!   it minus `VmRSS` before it, with the mark reset at the phase's start.
//! * The inputs are built on the main thread; the measured call runs on a
//!   new thread. glibc's malloc gives a new thread a new arena, so the call
//!   cannot quietly reuse memory the build phase freed (which would hide
//!   its peak from RSS).
//!
//! RSS counts 4 KiB pages that were touched, including the allocator's
//! slack and the new thread's stack and arena headers (a few pages), so the
//! figures are upper bounds on the heap bytes, rounded to pages. The size
//! of the `Allocation` is also estimated from its contents (a lower bound:
//! B-tree nodes' headers and allocator overhead are not counted).
//!
//! Exact heap bytes, as a cross-check (not needed to run this): run one
//! child under valgrind's massif; in its peak snapshot, the bytes under
//! `measure_call` frames are the call's, the rest are the inputs':
//!
//! ```text
//! valgrind --tool=massif --depth=200 --threshold=0.0 --peak-inaccuracy=0.0 \
//!     --massif-out-file=m.out target/release/examples/ipam_memory --child fresh 5000
//! ms_print m.out
//! ```

use std::process::Command;
use std::thread;

use trellis_operator::ipam::{Allocation, allocate};
use trellis_operator::plan::plan;

#[path = "../benches/support/mod.rs"]
mod support;

/// (scenario, nodes) in the order they are reported.
const RUNS: &[(&str, usize)] = &[
    ("fresh", 500),
    ("fresh", 5_000),
    ("steady", 500),
    ("steady", 5_000),
    ("join", 5_000),
    ("fresh_dual", 5_000),
    ("plan", 5_000),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, flag, scenario, n] if flag == "--child" => {
            let n: usize = n.parse().expect("N is a number of nodes");
            child(scenario, n);
        }
        [_] => parent(),
        _ => panic!("usage: ipam_memory [--child SCENARIO N]"),
    }
}

fn parent() {
    let exe = std::env::current_exe().expect("the path of this example");
    println!("resident memory, KiB (4 KiB pages; see the example's doc comment)");
    println!(
        "{:<18} {:>10} {:>12} {:>14} {:>10} {:>12}",
        "scenario", "base RSS", "build peak", "build retained", "call peak", "result est."
    );
    for (scenario, n) in RUNS {
        let out = Command::new(&exe)
            .args(["--child", scenario, &n.to_string()])
            .output()
            .expect("the child runs");
        assert!(
            out.status.success(),
            "child {scenario} {n} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout).expect("utf-8 from the child");
        let field = |key: &str| -> String {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "{:<18} {:>10} {:>12} {:>14} {:>10} {:>12}",
            format!("{scenario}/{n}"),
            field("base"),
            field("build_peak"),
            field("build_retained"),
            field("call_peak"),
            field("result_est"),
        );
    }
    println!(
        "base RSS: the child before building anything. build: making the inputs \
         (for steady and join this includes the allocate that derives the record; \
         for plan, the Snapshot and the first pass that makes the NodeNetworks). \
         build retained: resident after the build. call peak: the measured call \
         on a fresh thread, its peak over the RSS before it. result est.: the \
         Allocation's size from its contents (a lower bound; RSS cannot show it, \
         as freed pages stay resident)."
    );
}

/// `VmRSS` and `VmHWM` of this process, KiB.
fn rss_hwm() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("a VmRSS/VmHWM line in kB")
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// Resets the peak RSS mark to the current RSS.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("resetting VmHWM needs /proc/self/clear_refs (Linux >= 4.0)");
}

/// Peak (above the RSS at the start) and retained KiB of building something.
fn measure_build<T>(build: impl FnOnce() -> T) -> (T, u64, u64) {
    let (before, _) = rss_hwm();
    reset_peak();
    let value = build();
    let (after, peak) = rss_hwm();
    (
        value,
        peak.saturating_sub(before),
        after.saturating_sub(before),
    )
}

/// Runs `call` on a new thread (a new malloc arena): its peak KiB over the
/// RSS before it, and `size` of its result.
fn measure_call<T: Send>(
    call: impl FnOnce() -> T + Send,
    size: impl Fn(&T) -> usize + Send,
) -> (u64, usize) {
    thread::scope(|s| {
        s.spawn(move || {
            let (before, _) = rss_hwm();
            reset_peak();
            let result = call();
            let (_, peak) = rss_hwm();
            (peak.saturating_sub(before), size(&result))
        })
        .join()
        .expect("the measured call does not panic")
    })
}

fn child(scenario: &str, n: usize) {
    let (base, _) = rss_hwm();
    let (build_peak, build_retained, (call_peak, estimate)) = match scenario {
        "fresh" | "fresh_dual" => {
            let ((pools, nodes), bp, br) = measure_build(|| {
                let pools = if scenario == "fresh" {
                    support::v4_pools()
                } else {
                    support::dual_pools()
                };
                (pools, support::ipam_nodes(n))
            });
            let call = measure_call(|| allocate(&pools, &nodes, &[]), allocation_size);
            (bp, br, call)
        }
        "steady" | "join" => {
            let ((pools, nodes, record), bp, br) = measure_build(|| {
                let pools = support::v4_pools();
                let nodes = support::ipam_nodes(n);
                let recorded = if scenario == "steady" { n } else { n - 1 };
                let record = allocate(&pools, &nodes[..recorded], &[]).held();
                (pools, nodes, record)
            });
            let call = measure_call(|| allocate(&pools, &nodes, &record), allocation_size);
            (bp, br, call)
        }
        "plan" => {
            let (snapshot, bp, br) = measure_build(|| support::steady_snapshot(n));
            let now = support::time("2026-01-01T01:00:00Z");
            let call = measure_call(|| plan(&snapshot, &now), |p| p.writes());
            assert_eq!(call.1, 0, "a steady cluster writes nothing");
            (bp, br, call)
        }
        other => panic!("unknown scenario {other}"),
    };
    let estimate = if scenario == "plan" {
        "-".to_owned()
    } else {
        (estimate / 1024).to_string()
    };
    println!(
        "base={base} build_peak={build_peak} build_retained={build_retained} \
         call_peak={call_peak} result_est={estimate}"
    );
}

fn allocation_size(a: &Allocation) -> usize {
    support::allocation_bytes(a)
}
