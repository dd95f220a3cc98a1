/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Connection tracking per endpoint and direction (0004, step 2).
 *
 * An entry is made when the first packet of a connection is let through,
 * keyed by the endpoint, the direction it was seen in and the tuple as it
 * was seen. A later packet passes when it is that connection again
 * (established), the other side answering (reply: the reversed tuple, in
 * the other direction), or an ICMP error about it (related).
 *
 * What is a connection:
 * - TCP, UDP, SCTP: addresses and ports.
 * - ICMP echo: addresses and identifier; requests only match forward,
 *   replies only in reverse, so a peer cannot send requests (or answers
 *   nobody asked for) through an entry the pod's own ping made.
 * - other ICMP messages are not connections: neither tracked nor matched,
 *   policy decides each one.
 * - any other protocol (GRE, ESP, ...): addresses, ports 0.
 *
 * Entries expire (expires_ns, on bpf_ktime_get_coarse_ns()); an expired entry is
 * a miss, and the LRU map recycles it.
 */
#ifndef TRELLIS_CONNTRACK_H
#define TRELLIS_CONNTRACK_H

#include "maps.h"
#include "parse.h"

#define NS_PER_SEC 1000000000ull
/* Established TCP (and SCTP) connections idle for hours, as keepalives do
 * (Cilium uses the same 6 hours). */
#define CT_LIFETIME_TCP (6 * 3600 * NS_PER_SEC)
/* TCP or SCTP with no answer yet: a scan must not pin entries for hours. */
#define CT_LIFETIME_OPENING (60 * NS_PER_SEC)
/* After FIN or RST: long enough for the last ACKs and retransmissions. */
#define CT_LIFETIME_CLOSING (10 * NS_PER_SEC)
/* UDP, ICMP echo, other protocols. */
#define CT_LIFETIME_OTHER (60 * NS_PER_SEC)
/* Packets of a connection rewrite its expiry at most this often: a write
 * per packet would bounce the entry's cache line between CPUs. */
#define CT_REFRESH_EVERY NS_PER_SEC

/* How a packet relates to the connection table. */
#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2

/* Which lookups a packet takes part in. */
#define CT_MATCH_FORWARD 1 /* may be an established connection, may start one */
#define CT_MATCH_REPLY 2   /* may answer a connection of the other direction */

static __always_inline int ct_matches(const struct trellis_pkt *p)
{
	if (p->frag == FRAG_LATER)
		return 0;
	if (p->icmp == ICMP_KIND_ECHO_REQUEST)
		return CT_MATCH_FORWARD;
	if (p->icmp == ICMP_KIND_ECHO_REPLY)
		return CT_MATCH_REPLY;
	if (p->t.proto == IPPROTO_ICMP || p->t.proto == IPPROTO_ICMPV6) {
		/* ICMP of the other family is just another protocol. */
		if ((p->t.proto == IPPROTO_ICMP) == (p->family == TRELLIS_FAMILY_IPV4))
			return 0;
	}
	return CT_MATCH_FORWARD | CT_MATCH_REPLY;
}

static __always_inline void ct_key_of(struct trellis_ct_key *k, __u32 endpoint, __u8 dir,
				      const struct trellis_tuple *t, int reversed)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->endpoint = endpoint;
	k->dir = dir;
	k->proto = t->proto;
	if (reversed) {
		k->sport = t->dport;
		k->dport = t->sport;
		__builtin_memcpy(k->saddr, t->daddr, 16);
		__builtin_memcpy(k->daddr, t->saddr, 16);
	} else {
		k->sport = t->sport;
		k->dport = t->dport;
		__builtin_memcpy(k->saddr, t->saddr, 16);
		__builtin_memcpy(k->daddr, t->daddr, 16);
	}
}

static __always_inline __u64 ct_lifetime(__u8 proto, __u32 flags)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_SCTP) {
		if (flags & TRELLIS_CT_CLOSING)
			return CT_LIFETIME_CLOSING;
		if (flags & TRELLIS_CT_SEEN_REPLY)
			return CT_LIFETIME_TCP;
		return CT_LIFETIME_OPENING;
	}
	return CT_LIFETIME_OTHER;
}

static __always_inline __u32 ct_flags_of(const struct trellis_pkt *p)
{
	if (p->t.proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		return TRELLIS_CT_CLOSING;
	return 0;
}

/* The live entry for k, or NULL. */
static __always_inline struct trellis_ct_value *ct_find(const struct trellis_ct_key *k, __u64 now)
{
	struct trellis_ct_value *v = bpf_map_lookup_elem(&trellis_ct, k);

	if (v && v->expires_ns > now)
		return v;
	return NULL;
}

static __always_inline void ct_refresh(struct trellis_ct_value *v, __u8 proto, __u32 add_flags,
				       __u64 now)
{
	__u32 flags = v->flags | add_flags;
	__u64 expires = now + ct_lifetime(proto, flags);

	/* Closing shortens the expiry: that write must not be skipped. */
	if (flags != v->flags || expires > v->expires_ns + CT_REFRESH_EVERY) {
		v->flags = flags;
		v->expires_ns = expires;
	}
}

/*
 * Whether the packet an ICMP error quotes is a tracked connection of this
 * endpoint. That packet went the other way, so the question is whether it,
 * seen in the other direction, would have been established or a reply:
 * the error is then about a connection we let through. It does not
 * refresh the entry: an error says nothing about the connection being
 * alive, and anyone on the path can send one.
 */
static __always_inline int ct_related(struct __sk_buff *skb, __u32 endpoint, __u8 dir,
				      const struct trellis_pkt *p, __u64 now)
{
	struct trellis_pkt q = {};
	struct trellis_ct_key k;
	int matches;

	if (parse_quoted(skb, p, &q))
		return 0;
	matches = ct_matches(&q);
	if (matches & CT_MATCH_FORWARD) {
		ct_key_of(&k, endpoint, dir ^ 1, &q.t, 0);
		if (ct_find(&k, now))
			return 1;
	}
	if (matches & CT_MATCH_REPLY) {
		ct_key_of(&k, endpoint, dir, &q.t, 1);
		if (ct_find(&k, now))
			return 1;
	}
	return 0;
}

/*
 * Step 2 of 0004 for a packet that is not an ICMP error (ct_related() is
 * for those): CT_ESTABLISHED, CT_REPLY, or CT_NEW.
 *
 * A packet that may be either is looked up as a reply first when its source
 * port is below its destination port, else as the connection itself: a
 * client's port comes from its kernel's ephemeral range (Linux: 32768 and
 * up), above the ports services listen on, so this finds most packets with
 * one lookup instead of two for every reply. A wrong guess costs the second
 * lookup, as before, and only decides which of two entries a packet
 * refreshes in the one case both exist (each side opened the same tuple).
 */
static __always_inline int ct_lookup(__u32 endpoint, __u8 dir, const struct trellis_pkt *p,
				     __u64 now)
{
	struct trellis_ct_key k;
	struct trellis_ct_value *v;
	int matches, reply_first;

	matches = ct_matches(p);
	reply_first = p->ports && bpf_ntohs(p->t.sport) < bpf_ntohs(p->t.dport);
	for (int i = 0; i < 2; i++) {
		int reply = (i == 0) == reply_first;

		if (!(matches & (reply ? CT_MATCH_REPLY : CT_MATCH_FORWARD)))
			continue;
		if (reply)
			ct_key_of(&k, endpoint, dir ^ 1, &p->t, 1);
		else
			ct_key_of(&k, endpoint, dir, &p->t, 0);
		v = ct_find(&k, now);
		if (v) {
			ct_refresh(v, p->t.proto,
				   (reply ? TRELLIS_CT_SEEN_REPLY : 0) | ct_flags_of(p), now);
			return reply ? CT_REPLY : CT_ESTABLISHED;
		}
	}
	return CT_NEW;
}

/* Records the connection p starts, if it is one. -1 when the map refused. */
static __always_inline int ct_create(__u32 endpoint, __u8 dir, const struct trellis_pkt *p,
				     __u64 now)
{
	struct trellis_ct_key k;
	struct trellis_ct_value v = {};

	if (!(ct_matches(p) & CT_MATCH_FORWARD))
		return 0;
	ct_key_of(&k, endpoint, dir, &p->t, 0);
	v.flags = ct_flags_of(p);
	v.expires_ns = now + ct_lifetime(p->t.proto, v.flags);
	return bpf_map_update_elem(&trellis_ct, &k, &v, BPF_ANY) ? -1 : 0;
}

#endif /* TRELLIS_CONNTRACK_H */
