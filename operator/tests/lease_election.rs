//! Leader election against a real kube-apiserver + etcd: one leader at a time, takeover after a
//! crash (after the lease duration) and after a graceful shutdown (at once), stepping down
//! when the API server goes away or another holder is written in, and expiry timed by our own
//! clock whatever the lease's timestamps say.
//!
//! Every test starts its own control plane (`trellis-e2e-lease-<test>`), so they run in
//! parallel. Short durations keep them fast: lease 2 s, renew deadline 1.4 s, retry 0.4 s.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, api::PostParams};
use tokio::{sync::watch, task::JoinHandle};
use trellis_e2e::{ControlPlane, StartOptions};
use trellis_operator::lease::{Elector, LeaseConfig, LeaseError};

const NAMESPACE: &str = "default";
const LEASE: &str = "trellis-operator";
const LEASE_DURATION: Duration = Duration::from_millis(2000);
const RENEW_DEADLINE: Duration = Duration::from_millis(1400);
const RETRY: Duration = Duration::from_millis(400);
/// Room for scheduling and request latency on a loaded test machine.
const SLACK: Duration = Duration::from_millis(1000);
/// Limit for the first election, which includes the apiserver's first writes.
const FIRST_ELECTION: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(50);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "trellis_operator=info".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn start(test: &str) -> ControlPlane {
    init_tracing();
    ControlPlane::start(StartOptions {
        crd_dir: None,
        ..StartOptions::for_test(&format!("lease-{test}"))
    })
    .await
    .expect("start the control plane")
}

fn short(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: LEASE_DURATION,
        renew_deadline: RENEW_DEADLINE,
        retry_period: RETRY,
        ..LeaseConfig::new(NAMESPACE, LEASE, identity)
    }
}

/// One replica: its elector task and both ends we hold.
struct Candidate {
    identity: String,
    leading: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), LeaseError>>,
}

impl Candidate {
    fn spawn(client: &kube::Client, cfg: LeaseConfig) -> Self {
        let identity = cfg.identity.clone();
        let (leading_tx, leading) = watch::channel(false);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let elector = Elector::new(client.clone(), cfg);
        let task = tokio::spawn(elector.run(leading_tx, shutdown_rx));
        Candidate {
            identity,
            leading,
            shutdown,
            task,
        }
    }

    fn leads(&self) -> bool {
        *self.leading.borrow()
    }

    /// The task's result, which must come within `limit`.
    async fn result(self, limit: Duration) -> Result<(), LeaseError> {
        tokio::time::timeout(limit, self.task)
            .await
            .unwrap_or_else(|_| panic!("{}: run did not return within {limit:?}", self.identity))
            .expect("elector task panicked")
    }
}

/// Poll `probe` every [`POLL`] until it yields a value; panic after `limit`, saying `what`.
/// Returns the value and how long it took.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Wait until exactly one of `candidates` leads; its index.
async fn await_one_leader(candidates: &[&Candidate], limit: Duration) -> (usize, Duration) {
    eventually("a leader", limit, || async {
        let leaders: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].leads())
            .collect();
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        leaders.first().copied()
    })
    .await
}

async fn read_lease(api: &Api<Lease>) -> Lease {
    api.get(LEASE).await.expect("read the lease")
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref()
}

fn transitions(lease: &Lease) -> i32 {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or_default()
}

/// Two candidates racing for the lease in a fresh control plane, once one of
/// them leads: `(control plane, lease api, leader, follower)`.
async fn elected_pair(test: &str) -> (ControlPlane, Api<Lease>, Candidate, Candidate) {
    let cp = start(test).await;
    let client = cp.client();
    let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let a = Candidate::spawn(&client, short("a"));
    let b = Candidate::spawn(&client, short("b"));
    let (i, _) = await_one_leader(&[&a, &b], FIRST_ELECTION).await;
    let (leader, follower) = if i == 0 { (a, b) } else { (b, a) };
    (cp, api, leader, follower)
}

#[tokio::test(flavor = "multi_thread")]
async fn exactly_one_leader_and_it_holds_the_lease() {
    let mut cp = start("one-leader").await;
    let client = cp.client();
    let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let a = Candidate::spawn(&client, short("a"));
    let b = Candidate::spawn(&client, short("b"));

    let (i, took) = await_one_leader(&[&a, &b], FIRST_ELECTION).await;
    let (leader, follower) = if i == 0 { (&a, &b) } else { (&b, &a) };
    eprintln!("{} became leader after {took:?}", leader.identity);
    let lease = read_lease(&api).await;
    assert_eq!(holder(&lease), Some(leader.identity.as_str()));
    let spec = lease.spec.as_ref().expect("spec");
    assert_eq!(spec.lease_duration_seconds, Some(2));
    assert!(spec.acquire_time.is_some() && spec.renew_time.is_some());

    // Over many renewals and follower attempts: never both, and no flapping.
    let window = 8 * RETRY;
    let watched = Instant::now();
    let mut checks = 0;
    while watched.elapsed() < window {
        let (l, f) = (leader.leads(), follower.leads());
        assert!(!(l && f), "both lead after {:?}", watched.elapsed());
        assert!(
            l,
            "{} stopped leading after {:?}",
            leader.identity,
            watched.elapsed()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later = read_lease(&api).await;
    assert_eq!(holder(&later), Some(leader.identity.as_str()));
    assert_ne!(
        later.spec.as_ref().and_then(|s| s.renew_time.clone()),
        spec.renew_time,
        "the leader renews"
    );
    assert_eq!(transitions(&later), transitions(&lease), "no handover");
    eprintln!("{checks} checks over {window:?}: one leader throughout");

    a.task.abort();
    b.task.abort();
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_takes_over_after_the_leader_dies() {
    let (mut cp, api, leader, follower) = elected_pair("abrupt-death").await;
    let before = read_lease(&api).await;
    assert_eq!(holder(&before), Some(leader.identity.as_str()));

    // SIGKILL: no step-down, no release; the lease has to expire.
    leader.task.abort();
    let killed = Instant::now();
    let limit = LEASE_DURATION + 2 * RETRY + SLACK;
    eventually("the follower to lead", limit, || async {
        follower.leads().then_some(())
    })
    .await;
    let took = killed.elapsed();
    eprintln!(
        "{} took over {took:?} after {} was killed (limit {limit:?})",
        follower.identity, leader.identity
    );
    // It waited for the lease to expire: the duration from when it saw the last renewal,
    // which was at most a retry period (plus jitter) before the kill.
    assert!(
        took >= LEASE_DURATION - 2 * RETRY,
        "took over too early: {took:?}"
    );

    let after = read_lease(&api).await;
    assert_eq!(holder(&after), Some(follower.identity.as_str()));
    assert_eq!(transitions(&after), transitions(&before) + 1);
    assert_ne!(
        after.spec.as_ref().and_then(|s| s.acquire_time.clone()),
        before.spec.as_ref().and_then(|s| s.acquire_time.clone()),
        "a new term starts"
    );

    follower.task.abort();
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_shutdown_hands_over_at_once() {
    let (mut cp, api, leader, follower) = elected_pair("graceful").await;
    let before = read_lease(&api).await;

    let stopping = Instant::now();
    leader.shutdown.send(true).expect("the elector listens");
    // Once the lease no longer names the old leader, that leader must already have stepped
    // down: it publishes `false` before it sends the release.
    let (stepped_down, _) = eventually("the lease to change hands", LEASE_DURATION, || async {
        let lease = read_lease(&api).await;
        (holder(&lease) != Some(leader.identity.as_str())).then(|| !leader.leads())
    })
    .await;
    assert!(
        stepped_down,
        "{} still led after releasing",
        leader.identity
    );

    eventually("the follower to lead", LEASE_DURATION, || async {
        follower.leads().then_some(())
    })
    .await;
    let took = stopping.elapsed();
    eprintln!(
        "{} took over {took:?} after {} shut down",
        follower.identity, leader.identity
    );
    // Without the release it would have to wait out the lease: at least LEASE_DURATION.
    assert!(took < LEASE_DURATION / 2 + RETRY, "handover took {took:?}");
    let identity = leader.identity.clone();
    assert!(!leader.leads());
    leader
        .result(RENEW_DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{identity} after shutdown: {e}"));

    let after = read_lease(&api).await;
    assert_eq!(holder(&after), Some(follower.identity.as_str()));
    assert_eq!(transitions(&after), transitions(&before) + 1);
    assert_eq!(
        after.spec.as_ref().and_then(|s| s.lease_duration_seconds),
        Some(2),
        "the new holder writes its own duration over the release's 1 s"
    );

    follower.task.abort();
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}

#[tokio::test(flavor = "multi_thread")]
async fn follower_shutdown_leaves_the_lease_alone() {
    let (mut cp, api, leader, follower) = elected_pair("follower-shutdown").await;

    follower.shutdown.send(true).expect("the elector listens");
    follower.result(RENEW_DEADLINE).await.expect("clean stop");
    let lease = read_lease(&api).await;
    assert_eq!(holder(&lease), Some(leader.identity.as_str()));
    assert!(leader.leads());

    leader.shutdown.send(true).expect("the elector listens");
    leader.result(RENEW_DEADLINE).await.expect("clean stop");
    let lease = read_lease(&api).await;
    assert_eq!(holder(&lease), None, "released");
    assert_eq!(
        lease.spec.as_ref().and_then(|s| s.lease_duration_seconds),
        Some(1)
    );
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_steps_down_when_the_apiserver_goes_away() {
    let (mut cp, _api, leader, follower) = elected_pair("apiserver-lost").await;

    let stopping = Instant::now();
    // Ends the apiserver first (renewals fail from then on), then etcd.
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
    eprintln!("control plane stopped in {:?}", stopping.elapsed());

    // The last successful renewal started before the stop; the leader gives up at most
    // RENEW_DEADLINE after that, noticing within one retry period.
    let limit = RENEW_DEADLINE + RETRY + SLACK;
    eventually("the leader to step down", limit, || async {
        (!leader.leads()).then_some(())
    })
    .await;
    let took = stopping.elapsed();
    eprintln!(
        "{} stepped down {took:?} after the control plane began to stop (limit {limit:?})",
        leader.identity
    );
    assert!(took < limit, "stepped down only after {took:?}");
    assert!(!follower.leads(), "nobody can lead without an API server");

    let identity = leader.identity.clone();
    match leader.result(SLACK).await {
        Err(LeaseError::Lost { lease, since }) => {
            assert_eq!(lease, format!("{NAMESPACE}/{LEASE}"));
            assert!(since >= RENEW_DEADLINE, "{since:?}");
        }
        other => panic!("{identity}: expected Lost, got {other:?}"),
    }
    follower.task.abort();
}

/// A lease held by `ghost` whose `renewTime` is `skew` away from our wall clock, as written
/// by a node whose clock is off.
fn ghost_lease(name: &str, skew: SignedDuration) -> Lease {
    let then = MicroTime(Timestamp::now().checked_add(skew).expect("representable"));
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost".into()),
            lease_duration_seconds: Some(2),
            acquire_time: Some(then.clone()),
            renew_time: Some(then),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_is_timed_by_our_clock_not_the_lease_timestamps() {
    let mut cp = start("clock-skew").await;
    let client = cp.client();
    let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let hour = SignedDuration::from_hours(1);
    for (name, skew) in [("skew-past", -hour), ("skew-future", hour)] {
        api.create(&PostParams::default(), &ghost_lease(name, skew))
            .await
            .expect("create the ghost's lease");
    }
    // A renewTime an hour old does not make the lease free (a wall-clock comparison would
    // take it at once), and one an hour ahead does not keep it (one would wait an hour):
    // both are taken once we have seen them unchanged for their duration.
    let started = Instant::now();
    let past = Candidate::spawn(
        &client,
        LeaseConfig {
            name: "skew-past".into(),
            ..short("a")
        },
    );
    let future = Candidate::spawn(
        &client,
        LeaseConfig {
            name: "skew-future".into(),
            ..short("b")
        },
    );
    let limit = LEASE_DURATION + 2 * RETRY + SLACK;
    for c in [&past, &future] {
        eventually("the ghost's lease to be taken", limit, || async {
            c.leads().then_some(())
        })
        .await;
        let took = started.elapsed();
        eprintln!("{} took the ghost's lease after {took:?}", c.identity);
        assert!(
            took >= LEASE_DURATION,
            "{} took over early: {took:?}",
            c.identity
        );
    }
    for name in ["skew-past", "skew-future"] {
        let lease = api.get(name).await.expect("read the lease");
        assert_ne!(holder(&lease), Some("ghost"));
        assert_eq!(transitions(&lease), 1);
    }
    past.task.abort();
    future.task.abort();
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}

#[tokio::test(flavor = "multi_thread")]
async fn leader_steps_down_when_another_holder_is_written_in() {
    let mut cp = start("taken").await;
    let client = cp.client();
    let api: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let a = Candidate::spawn(&client, short("a"));
    await_one_leader(&[&a], FIRST_ELECTION).await;

    let mut lease = read_lease(&api).await;
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
    }
    api.replace(LEASE, &PostParams::default(), &lease)
        .await
        .expect("write another holder in");
    let written = Instant::now();
    let limit = 2 * RETRY + SLACK;
    eventually("the leader to step down", limit, || async {
        (!a.leads()).then_some(())
    })
    .await;
    eprintln!("a stepped down {:?} after the intruder", written.elapsed());
    match a.result(SLACK).await {
        Err(LeaseError::Taken { holder, .. }) => assert_eq!(holder, "intruder"),
        other => panic!("expected Taken, got {other:?}"),
    }
    tokio::task::block_in_place(|| cp.stop()).expect("stop the control plane");
}
