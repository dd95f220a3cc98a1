//! The operator's garbage collection of SecurityIdentities on a real sandbox (design 0005),
//! with a grace period of 2 s (`--identity-gc-grace-seconds 2`) instead of ten minutes.
//!
//! ```text
//!  trellis-node-1 (A)                      trellis-node-2 (B)
//!  server   app=server  TCP :80            client    app=client     (allowed to server:80)
//!  ephemeral app=ephemeral (added, removed) stranger app=stranger   (denied)
//!  NetworkPolicy trellis-idgc/server-ingress: app=server accepts TCP 80 from app=client only
//!
//!  (a) ephemeral added ─▶ its identity exists ─▶ pod removed ─▶ the identity is deleted,
//!      no sooner than the grace period after the removal
//!  (b) 3 × { create an identity no pod has ─▶ it is deleted (≥ grace later: a pass ran) }
//!      ─▶ the identities of server, client and stranger are the same objects (UIDs) all along
//!  (c) delete the identities of client and server by hand ─▶ their nodes create them again,
//!      same number, same labels, new UIDs ─▶ client reaches server:80 again, stranger never
//!      does ─▶ one more pass (an unused identity collected) leaves the new ones alone
//!  /metrics: trellis_operator_identities_collected_total counts the deletions
//! ```
//!
//! Every wait is on a condition with a bound; "a pass ran" is an unused identity seen gone,
//! never a sleep. The sandbox lives in `/tmp/trellis-e2e-identity-gc`. Needs root.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};
use trellis_api::v1alpha1::SecurityIdentity;
use trellis_e2e::{
    OperatorOptions, PodName, StartOptions,
    cluster::{
        add_pods, app_pod, apply_namespace, apply_policy, ingress_from_app, shard_identity,
        start_cluster,
    },
    operator, samples,
    truth::{
        Observed, Protocol,
        traffic::{PROBE_TIMEOUT, probe, serve},
        world::{FIELD_MANAGER, wait_nodes_ready},
    },
    wait_for,
};
use trellis_policy::identity::{SecurityLabels, allocate};
use trellis_policy::objects::{identity_of, security_identity};

const TEST: &str = "identity-gc";
const NODE_A: &str = "trellis-node-1";
const NODE_B: &str = "trellis-node-2";
const NAMESPACE: &str = "trellis-idgc";
const POLICY: &str = "server-ingress";
const PORT: u16 = 80;
const GRACE: Duration = Duration::from_secs(2);
/// Unused identities created and collected in (b): each proves a pass ran at least a grace
/// period after the one before.
const ROUNDS: usize = 3;
/// Bound of every wait on the cluster.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `node`'s shard lists pod `name`; its identity.
async fn wait_shard_identity(client: &Client, node: &str, name: &str) -> u32 {
    let pod = PodName::new(NAMESPACE, name);
    wait_for(
        &format!("{node}'s NodeEndpoints to list {NAMESPACE}/{name}"),
        TIMEOUT,
        || shard_identity(client, node, &pod),
    )
    .await
}

async fn get_identity(api: &Api<SecurityIdentity>, id: u32) -> Option<SecurityIdentity> {
    api.get_opt(&id.to_string())
        .await
        .unwrap_or_else(|e| panic!("read SecurityIdentity {id}: {e}"))
}

fn uid(i: &SecurityIdentity) -> String {
    i.metadata
        .uid
        .clone()
        .expect("an object from the apiserver has a uid")
}

/// Waits until SecurityIdentity `id` exists; the object.
async fn wait_identity(api: &Api<SecurityIdentity>, id: u32) -> SecurityIdentity {
    wait_for(&format!("SecurityIdentity {id} to exist"), TIMEOUT, || {
        get_identity(api, id)
    })
    .await
}

/// Waits until the object of SecurityIdentity `id` with UID `uid` is gone (deleted, or
/// replaced by another object of the same name); how long that took from `since`.
async fn wait_gone(api: &Api<SecurityIdentity>, id: u32, uid: &str, since: Instant) -> Duration {
    wait_for(
        &format!("SecurityIdentity {id} (uid {uid}) to be collected"),
        TIMEOUT,
        || async {
            let current = get_identity(api, id).await;
            current
                .is_none_or(|i| i.metadata.uid.as_deref() != Some(uid))
                .then(|| since.elapsed())
        },
    )
    .await
}

/// Creates an identity of a label set no pod has (`app=<app>` in the test's namespace), at
/// the number a node would pick for it; the object.
async fn create_unused(api: &Api<SecurityIdentity>, app: &str) -> SecurityIdentity {
    let labels = SecurityLabels::new(
        NAMESPACE,
        BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            NAMESPACE.to_string(),
        )]),
        BTreeMap::from([("app".to_string(), app.to_string())]),
    );
    let existing: BTreeMap<u32, SecurityLabels> = api
        .list(&ListParams::default())
        .await
        .expect("list SecurityIdentities")
        .items
        .iter()
        .filter_map(|i| identity_of(i).ok())
        .collect();
    let id = allocate(&labels, |id| existing.get(&id)).expect("a free identity");
    let object = security_identity(id, &labels).expect("a valid identity");
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create SecurityIdentity {id} for {labels}: {e}"))
}

/// Proof that the operator ran a collection pass at least a grace period after now: an
/// identity no pod has, created now, is collected (and not before the grace period).
async fn a_pass_ran(api: &Api<SecurityIdentity>, app: &str) {
    let created = Instant::now();
    let unused = create_unused(api, app).await;
    let id: u32 = unused
        .metadata
        .name
        .as_deref()
        .and_then(|n| n.parse().ok())
        .expect("a numeric name");
    let took = wait_gone(api, id, &uid(&unused), created).await;
    assert!(
        took >= GRACE,
        "unused identity {id} ({app}) was collected {took:?} after its creation, within the \
         {GRACE:?} grace period"
    );
    eprintln!("unused identity {id} ({app}) collected after {took:.1?}");
}

/// Every identity of `used` (id → UID) is still the same object.
async fn assert_unchanged(api: &Api<SecurityIdentity>, used: &BTreeMap<u32, String>, when: &str) {
    for (id, want) in used {
        let found = get_identity(api, *id).await;
        assert_eq!(
            found.as_ref().map(uid).as_deref(),
            Some(want.as_str()),
            "{when}: SecurityIdentity {id}, which a running pod's shard names, was deleted \
             (now: {found:?})"
        );
    }
}

/// One TCP connection from `netns` to `target`.
async fn connect(netns: &Path, target: SocketAddr) -> Observed {
    probe(Some(netns), Protocol::Tcp, target, PROBE_TIMEOUT).await
}

/// Probes until `allowed` reaches `server` (answered by it); `denied` must never get
/// through, at any probe (fail closed, also while an identity is missing).
async fn wait_policy_holds(
    what: &str,
    server: (&str, SocketAddr),
    allowed: &Path,
    denied: &Path,
    denied_before_first: bool,
) {
    let (name, target) = server;
    let mut first = true;
    wait_for(what, TIMEOUT, || {
        let check_denied = denied_before_first || !first;
        first = false;
        async move {
            let (a, d) = tokio::join!(connect(allowed, target), connect(denied, target));
            let denied_ok = !d.is_allowed(name);
            if check_denied && !denied_ok {
                panic!("{what}: the stranger reached {target}: {d}");
            }
            (a.is_allowed(name) && denied_ok).then_some(())
        }
    })
    .await;
}

/// A counter's value from the operator's /metrics.
async fn metric(port: u16, name: &str) -> Option<f64> {
    let (status, body) = operator::http_get(port, "/metrics", Duration::from_secs(5))
        .await
        .ok()?;
    (status == 200).then_some(())?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_identities_are_collected_and_used_ones_stay() {
    let t0 = Instant::now();
    let mut opts = StartOptions::for_test(TEST);
    opts.operator = Some(OperatorOptions {
        extra_args: vec![
            "--identity-gc-grace-seconds".into(),
            GRACE.as_secs().to_string(),
        ],
        ..OperatorOptions::default()
    });
    let pools = samples::ippools(samples::IPPOOL_SAMPLE).expect("IPPool sample");
    let cp = start_cluster(opts, 2, &pools, FIELD_MANAGER)
        .await
        .expect("the sandbox starts with its IPPools");
    let client = cp.client();
    wait_nodes_ready(&client, 2).await;
    apply_namespace(&client, NAMESPACE, FIELD_MANAGER)
        .await
        .expect("apply the namespace");
    let metrics_port = cp
        .endpoints()
        .operator_metrics_port
        .expect("the operator's metrics port");
    let identities: Api<SecurityIdentity> = Api::all(client.clone());
    let pods = cp.pods();

    let specs = [
        app_pod(NAMESPACE, "server", NODE_A, "server"),
        app_pod(NAMESPACE, "client", NODE_B, "client"),
        app_pod(NAMESPACE, "stranger", NODE_B, "stranger"),
    ];
    let [(server, server_ip), (client_pod, _), (stranger, _)]: [_; 3] = add_pods(&pods, &specs)
        .await
        .expect("add the server, the client and the stranger")
        .try_into()
        .expect("three pods");
    let server_name = format!("{NAMESPACE}/server");
    let _servers = serve(Some(&server.netns_path()), &server_name, &[PORT])
        .await
        .expect("the server's listener");
    let target = SocketAddr::new(server_ip, PORT);
    let (client_ns, stranger_ns) = (client_pod.netns_path(), stranger.netns_path());

    let np = ingress_from_app(NAMESPACE, POLICY, "server", "client", PORT);
    apply_policy(&client, &np, FIELD_MANAGER)
        .await
        .expect("apply the NetworkPolicy");
    // Before the policy reaches node A the stranger gets through: not checked yet.
    wait_policy_holds(
        "the policy: client reaches server:80, stranger does not",
        (&server_name, target),
        &client_ns,
        &stranger_ns,
        false,
    )
    .await;
    wait_policy_holds(
        "the policy, once more",
        (&server_name, target),
        &client_ns,
        &stranger_ns,
        true,
    )
    .await;

    // The identities the running pods use, as their shards name them.
    let mut used = BTreeMap::new();
    let mut by_pod = BTreeMap::new();
    for (node, pod) in [(NODE_A, "server"), (NODE_B, "client"), (NODE_B, "stranger")] {
        let id = wait_shard_identity(&client, node, pod).await;
        let object = wait_identity(&identities, id).await;
        used.insert(id, uid(&object));
        by_pod.insert(pod, (node, id, object));
    }
    assert_eq!(
        used.len(),
        3,
        "three label sets, three identities: {used:?}"
    );
    eprintln!("[{:.1?}] identities in use: {used:?}", t0.elapsed());

    // (a) A pod's identity goes once the pod has gone for the grace period.
    pods.add(&app_pod(NAMESPACE, "ephemeral", NODE_A, "ephemeral"))
        .await
        .expect("add the ephemeral pod");
    let ephemeral = wait_shard_identity(&client, NODE_A, "ephemeral").await;
    assert!(!used.contains_key(&ephemeral), "a label set of its own");
    let ephemeral_uid = uid(&wait_identity(&identities, ephemeral).await);
    let removed = Instant::now();
    assert!(
        pods.remove(PodName::new(NAMESPACE, "ephemeral"))
            .await
            .expect("remove the ephemeral pod"),
        "the pod existed"
    );
    let took = wait_gone(&identities, ephemeral, &ephemeral_uid, removed).await;
    assert!(
        took >= GRACE,
        "identity {ephemeral} was collected {took:?} after its pod was removed, within the \
         {GRACE:?} grace period"
    );
    eprintln!(
        "[{:.1?}] (a) identity {ephemeral} of the removed pod collected {took:.1?} after the removal",
        t0.elapsed()
    );
    assert_eq!(
        shard_identity(&client, NODE_A, &PodName::new(NAMESPACE, "ephemeral")).await,
        None,
        "the shard no longer lists the removed pod"
    );
    assert_unchanged(&identities, &used, "after (a)").await;

    // (b) Used identities survive pass after pass.
    for round in 1..=ROUNDS {
        a_pass_ran(&identities, &format!("trellis-unused-{round}")).await;
        assert_unchanged(&identities, &used, &format!("after pass proof {round}")).await;
    }
    eprintln!(
        "[{:.1?}] (b) the identities in use survived {ROUNDS} proven passes",
        t0.elapsed()
    );

    // (c) An identity deleted by hand comes back from the node whose pod uses it.
    let mut recreated = BTreeMap::new();
    for pod in ["client", "server"] {
        let (node, id, old) = &by_pod[pod];
        identities
            .delete(&id.to_string(), &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete SecurityIdentity {id} ({pod}'s) by hand: {e}"));
        let old_uid = uid(old);
        let again = wait_for(
            &format!("{node} to create SecurityIdentity {id} ({pod}'s) again"),
            TIMEOUT,
            || async {
                get_identity(&identities, *id)
                    .await
                    .filter(|i| i.metadata.uid.as_deref() != Some(old_uid.as_str()))
            },
        )
        .await;
        assert_eq!(
            again.spec, old.spec,
            "SecurityIdentity {id} came back with other labels"
        );
        assert_eq!(
            shard_identity(&client, node, &PodName::new(NAMESPACE, pod)).await,
            Some(*id),
            "{pod} keeps its identity number"
        );
        recreated.insert(*id, uid(&again));
    }
    eprintln!(
        "[{:.1?}] (c) identities deleted by hand are back: {recreated:?}",
        t0.elapsed()
    );
    wait_policy_holds(
        "the policy after the identities came back",
        (&server_name, target),
        &client_ns,
        &stranger_ns,
        true,
    )
    .await;
    let mut still_used = used.clone();
    still_used.extend(recreated);
    a_pass_ran(&identities, "trellis-unused-after-recreation").await;
    assert_unchanged(&identities, &still_used, "after the re-creation").await;

    // The deletions are counted: the ephemeral pod's and the unused ones (those deleted by
    // hand are not the operator's).
    let collected = (1 + ROUNDS + 1) as f64;
    let counted = wait_for("the operator's /metrics", TIMEOUT, || {
        metric(metrics_port, "trellis_operator_identities_collected_total")
    })
    .await;
    assert_eq!(
        counted, collected,
        "trellis_operator_identities_collected_total"
    );
    assert_eq!(
        metric(
            metrics_port,
            "trellis_operator_writes_total{kind=\"security_identity_delete\"}"
        )
        .await,
        Some(collected)
    );
    eprintln!("[{:.1?}] identity collection: done", t0.elapsed());
}
