// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Network policy for one pod, on the host side of its veth.
 *
 *   pod netns           node netns
 *   eth0  ──veth──▶  trellisXXXXXXXX  tcx/clsact ingress: trellis_from_pod (the pod's egress policy)
 *   eth0  ◀──veth──  trellisXXXXXXXX  tcx/clsact egress:  trellis_to_pod   (the pod's ingress policy)
 *
 * Both programs key everything by skb->ifindex, the host veth's index in
 * the node's namespace (the device the packet is on in both hooks), and
 * run the per-packet algorithm of docs/design/0004-policy-datapath.md:
 *
 *   1. endpoint entry? (no: drop) ─ ARP: pass ─ not IPv4/IPv6 or malformed: drop
 *   2. conntrack: established / reply / related: pass
 *   3. direction not isolated: track, pass
 *   4. IP cache → (identity, cidr identity) → policy table: allow (track, pass) / deny / none: drop
 *
 * Later IP fragments, which have no ports, are decided by lib/fragments.h.
 * Every verdict is counted per reason and direction (lib/counters.h).
 */

#include "common.h"
#include "maps.h"
#include "counters.h"
#include "parse.h"
#include "conntrack.h"
#include "fragments.h"
#include "policy.h"

/* Whether a reason code is one of the passes. Only the known ones: a code
 * this file does not list (a new reason added without updating this)
 * drops, and the tests notice. */
static __always_inline int is_pass(__u32 reason)
{
	return reason >= TRELLIS_PASS_ARP && reason <= TRELLIS_PASS_FRAGMENT_FOLLOWS;
}

/*
 * The rest of step 2 (an ICMP error about a tracked connection) and steps
 * 3 and 4, for a parsed packet that is not a later fragment and that
 * conntrack did not find as established or a reply; returns the reason of
 * the verdict.
 *
 * A global function, on purpose (the one exception to header-only inline
 * code): the verifier checks it once, on its own, with its arguments
 * unknown. Inlined, it was checked again for every state the parser can
 * leave behind (each family, protocol and ICMP kind), over 100,000
 * instructions for one program; this way the whole program stays far
 * below the kernel's limit however the lookups grow.
 */
__attribute__((noinline)) int trellis_decide(struct __sk_buff *skb,
					     const struct trellis_pkt *p,
					     const struct trellis_endpoint *ep, __u32 dir, __u64 now)
{
	struct trellis_policy_value match;
	__u32 identity, cidr_identity, policy, plens, isolated;
	__u32 ifindex = skb->ifindex;
	const __be32 *remote;

	/* The verifier makes a global function check its pointers for NULL;
	 * the caller always passes its stack copies. */
	if (!p || !ep)
		return TRELLIS_DROP_MALFORMED;
	dir &= 1;

	if (p->icmp == ICMP_KIND_ERROR && ct_related(skb, ifindex, dir, p, now))
		return TRELLIS_PASS_RELATED;

	if (dir == TRELLIS_DIR_INGRESS) {
		isolated = ep->flags & TRELLIS_EP_INGRESS_ISOLATED;
		policy = ep->ingress_policy;
		plens = ep->ingress_plens;
		remote = p->t.saddr;
	} else {
		isolated = ep->flags & TRELLIS_EP_EGRESS_ISOLATED;
		policy = ep->egress_policy;
		plens = ep->egress_plens;
		remote = p->t.daddr;
	}
	/*
	 * A connection we cannot record would have its replies dropped (when
	 * the other direction is isolated), so we do not start it: the map
	 * failing is treated like a missing map, fail closed.
	 */
	if (!isolated)
		return ct_create(ifindex, dir, p, now) ? TRELLIS_DROP_CT_FULL
						       : TRELLIS_PASS_NOT_ISOLATED;

	ipcache_lookup(p, remote, &identity, &cidr_identity);
	if (!policy_match(policy, plens, identity, cidr_identity, p, &match))
		return TRELLIS_DROP_NO_MATCH;
	/* Anything but allow denies, also an action this version does not know. */
	if (match.action != TRELLIS_ACTION_ALLOW)
		return TRELLIS_DROP_POLICY_DENY;
	return ct_create(ifindex, dir, p, now) ? TRELLIS_DROP_CT_FULL : TRELLIS_PASS_POLICY_ALLOW;
}

static __always_inline int handle(struct __sk_buff *skb, const __u8 dir)
{
	__u32 ifindex = skb->ifindex;
	struct trellis_endpoint *entry = bpf_map_lookup_elem(&trellis_endpoints, &ifindex);
	struct trellis_endpoint ep;
	struct trellis_pkt p = {};
	__u32 reason, isolated;
	__be16 eth_proto;
	__u64 now;

	if (!entry)
		return drop(TRELLIS_DROP_UNKNOWN_ENDPOINT, dir);
	/*
	 * One copy, then never the map value again: trellis-node switches an
	 * endpoint to a new table with one update, and the packet must use
	 * the identity, flags, table and prefix lengths of one version.
	 */
	ep = *entry;
	barrier();

	/* A tag the device offloaded is not in the data: still not plain IP. */
	if (skb->vlan_present)
		return drop(TRELLIS_DROP_NOT_IP, dir);
	if (eth_proto_of(skb, &eth_proto))
		return drop(TRELLIS_DROP_MALFORMED, dir);
	if (eth_proto == bpf_htons(ETH_P_ARP))
		return pass(TRELLIS_PASS_ARP, dir);
	if (eth_proto != bpf_htons(ETH_P_IP) && eth_proto != bpf_htons(ETH_P_IPV6))
		return drop(TRELLIS_DROP_NOT_IP, dir);
	if (parse_packet(skb, bpf_ntohs(eth_proto), &p))
		return drop(TRELLIS_DROP_MALFORMED, dir);

	/*
	 * The coarse clock (CLOCK_MONOTONIC at the last tick): lifetimes are
	 * seconds to hours and an entry is refreshed at most once a second, so
	 * a tick's lag does not matter, and it is a read of the timekeeper
	 * where bpf_ktime_get_ns() calls the clocksource through a pointer
	 * (behind a retpoline on mitigated machines) on every packet.
	 */
	now = bpf_ktime_get_coarse_ns();
	if (p.frag == FRAG_LATER) {
		isolated = ep.flags & (dir == TRELLIS_DIR_INGRESS ? TRELLIS_EP_INGRESS_ISOLATED
								  : TRELLIS_EP_EGRESS_ISOLATED);
		if (!isolated)
			return pass(TRELLIS_PASS_NOT_ISOLATED, dir);
		if (frag_known(ifindex, dir, &p, now))
			return pass(TRELLIS_PASS_FRAGMENT_FOLLOWS, dir);
		return drop(TRELLIS_DROP_FRAGMENT, dir);
	}

	/*
	 * Established connections and replies, nearly every packet, are found
	 * here rather than in trellis_decide(): a call and return fewer. ICMP
	 * errors parse the packet they quote, which is the general path's work
	 * and stays in there for the verifier's sake.
	 */
	switch (p.icmp == ICMP_KIND_ERROR ? CT_NEW : ct_lookup(ifindex, dir, &p, now)) {
	case CT_ESTABLISHED:
		reason = TRELLIS_PASS_ESTABLISHED;
		break;
	case CT_REPLY:
		reason = TRELLIS_PASS_REPLY;
		break;
	default:
		reason = trellis_decide(skb, &p, &ep, dir, now);
	}
	if (!is_pass(reason))
		return drop(reason, dir);
	if (p.frag == FRAG_FIRST)
		frag_remember(ifindex, dir, &p, now);
	return pass(reason, dir);
}

/* Attached to the host-side veth's ingress (tcx or clsact): what the pod
 * sends, so the pod's egress policy. */
SEC("classifier")
int trellis_from_pod(struct __sk_buff *skb)
{
	return handle(skb, TRELLIS_DIR_EGRESS);
}

/* Attached to the host-side veth's egress (tcx or clsact): what the pod
 * receives, so the pod's ingress policy. */
SEC("classifier")
int trellis_to_pod(struct __sk_buff *skb)
{
	return handle(skb, TRELLIS_DIR_INGRESS);
}

/* Of the two licenses on the SPDX line, the one the kernel recognises
 * (GPL-only helpers and kfuncs stay usable). */
char _license[] SEC("license") = "GPL";
