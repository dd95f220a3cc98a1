//! Which policy a node enforces, as one string both the node and the
//! operator compute: the node reports it in `NetworkStatus.status.policyHash`
//! once its maps hold it; whoever rolls realisation up compares it with
//! the hash of the policies and bundles it sees.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use trellis_api::v1alpha1::{PolicyBundle, PolicyEnforcement};

use crate::fnv::Fnv1a;

/// `v1-` and 16 hex digits: FNV-1a (64 bits) over the enforcement mode and,
/// sorted, one line per object: each NetworkPolicy's
/// `namespace/name/uid/generation` and each PolicyBundle's
/// `PolicyBundle:name/uid/generation` (a namespace never holds `:` or an
/// upper-case letter, so the two kinds of line cannot collide, and without
/// bundles the hash is what it was before bundles). A changed spec bumps
/// the generation, so the hash changes with every edit, and only with an
/// edit (labels, annotations and status do not count: they change nothing
/// that is enforced). The encoding is fixed: nodes and operators of
/// different versions must agree on it.
pub fn policy_hash(
    enforcement: PolicyEnforcement,
    policies: &[NetworkPolicy],
    bundles: &[PolicyBundle],
) -> String {
    let mut lines: Vec<String> = policies
        .iter()
        .map(|p| {
            let m = &p.metadata;
            format!(
                "{}/{}/{}/{}",
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
                m.uid.as_deref().unwrap_or_default(),
                m.generation.unwrap_or_default()
            )
        })
        .chain(bundles.iter().map(|b| {
            let m = &b.metadata;
            format!(
                "PolicyBundle:{}/{}/{}",
                m.name.as_deref().unwrap_or_default(),
                m.uid.as_deref().unwrap_or_default(),
                m.generation.unwrap_or_default()
            )
        }))
        .collect();
    lines.sort();
    let mode = match enforcement {
        PolicyEnforcement::Default => "Default",
        PolicyEnforcement::Always => "Always",
        PolicyEnforcement::Never => "Never",
    };
    let mut h = Fnv1a::new();
    h.write(mode.as_bytes());
    for l in &lines {
        h.write(b"\n");
        h.write(l.as_bytes());
    }
    format!("v1-{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn np(ns: &str, name: &str, uid: &str, generation: i64) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            ..NetworkPolicy::default()
        }
    }

    /// Golden values: nodes and operators of different versions compare these
    /// strings, so they never change. If this test fails, revert the change.
    /// (Computed independently of this code: FNV-1a 64 of the documented
    /// encoding, e.g. "Default\nx/a/u1/1\ny/b/u2/3".)
    #[test]
    fn the_hash_is_fixed_by_its_encoding() {
        let cases = [
            (PolicyEnforcement::Default, vec![], "v1-11326fd2590f4e5e"),
            (PolicyEnforcement::Never, vec![], "v1-8b97ea84af17c029"),
            (
                PolicyEnforcement::Default,
                vec![np("y", "b", "u2", 3), np("x", "a", "u1", 1)],
                "v1-06f6ee872f7f7b11",
            ),
            (
                PolicyEnforcement::Always,
                vec![np("shop", "web", "0b5e-uid", 2)],
                "v1-ab2e2dc0fe540032",
            ),
        ];
        for (mode, policies, hash) in cases {
            assert_eq!(
                policy_hash(mode, &policies, &[]),
                hash,
                "{mode:?} {policies:?}"
            );
        }
    }

    #[test]
    fn order_does_not_count_and_every_edit_does() {
        let a = np("x", "a", "u1", 1);
        let b = np("y", "b", "u2", 3);
        let base = policy_hash(PolicyEnforcement::Default, &[a.clone(), b.clone()], &[]);
        assert_eq!(
            base,
            policy_hash(PolicyEnforcement::Default, &[b.clone(), a.clone()], &[])
        );
        let others = [
            policy_hash(PolicyEnforcement::Always, &[a.clone(), b.clone()], &[]),
            policy_hash(PolicyEnforcement::Default, std::slice::from_ref(&a), &[]),
            policy_hash(
                PolicyEnforcement::Default,
                &[a.clone(), np("y", "b", "u2", 4)],
                &[],
            ),
            // Deleted and made again under the same name: another uid.
            policy_hash(
                PolicyEnforcement::Default,
                &[a.clone(), np("y", "b", "u3", 3)],
                &[],
            ),
            // A bundle counts.
            policy_hash(
                PolicyEnforcement::Default,
                &[a.clone(), b.clone()],
                &[pb("protect", "u9", 1)],
            ),
        ];
        for o in others {
            assert_ne!(o, base);
        }
    }

    fn pb(name: &str, uid: &str, generation: i64) -> PolicyBundle {
        let mut b = PolicyBundle::new(
            name,
            trellis_api::v1alpha1::PolicyBundleSpec {
                tier: trellis_api::v1alpha1::Tier::Admin,
                priority: 1,
                subject: Default::default(),
                ingress: Vec::new(),
                egress: Vec::new(),
            },
        );
        b.metadata.uid = Some(uid.into());
        b.metadata.generation = Some(generation);
        b
    }

    #[test]
    fn bundles_count_by_name_uid_and_generation() {
        let a = np("x", "a", "u1", 1);
        let with = |bundles: &[PolicyBundle]| {
            policy_hash(
                PolicyEnforcement::Default,
                std::slice::from_ref(&a),
                bundles,
            )
        };
        let base = with(&[pb("p", "u9", 1), pb("q", "u8", 2)]);
        // Order does not count; every edit, a recreation and a removal do.
        assert_eq!(base, with(&[pb("q", "u8", 2), pb("p", "u9", 1)]));
        for other in [
            with(&[pb("p", "u9", 2), pb("q", "u8", 2)]),
            with(&[pb("p", "u7", 1), pb("q", "u8", 2)]),
            with(&[pb("q", "u8", 2)]),
            with(&[]),
        ] {
            assert_ne!(other, base);
        }
        // A bundle line is never mistaken for a policy in a namespace of
        // the same name: that namespace would be "PolicyBundle:p", which
        // no namespace can be called.
        assert_ne!(
            with(&[pb("p", "u9", 1)]),
            policy_hash(
                PolicyEnforcement::Default,
                &[a.clone(), np("policybundle", "p", "u9", 1)],
                &[]
            )
        );
    }
}
