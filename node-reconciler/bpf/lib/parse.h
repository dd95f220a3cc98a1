/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Packet parsing: IPv4 (with options), IPv6 (with its common extension
 * headers), and the first bytes of TCP, UDP, SCTP, ICMP and ICMPv6, plus the
 * packet an ICMP error carries.
 *
 * Two ways in. The common packet (IPv4 without options, IPv6 without
 * extension headers, its first headers in the skb's linear area) is read in
 * place by parse_direct(). Everything else, and the packet an ICMP error
 * quotes, is copied header by header with bpf_skb_load_bytes(), which also
 * reads a non-linear skb's fragments and bounds-checks at run time: a
 * header that is not all there is a failed read (and the packet is dropped
 * as malformed) instead of a verifier proof to maintain. Both fill
 * struct trellis_pkt through the same functions (ipv4_fill, ipv6_fill,
 * l4_fill), so they cannot disagree on what a header means.
 */
#ifndef TRELLIS_PARSE_H
#define TRELLIS_PARSE_H

#include "common.h"

/* The bound on IPv6 extension headers we walk before giving up (and
 * dropping): real traffic carries one or two. */
#define TRELLIS_MAX_EXTHDRS 6

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PARAMPROB 4 /* 1..4: the error types */
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

/* trellis_pkt.frag */
#define FRAG_NONE 0
#define FRAG_FIRST 1 /* offset 0, more fragments follow: has the L4 header */
#define FRAG_LATER 2 /* offset > 0: no L4 header at all */

/* trellis_pkt.icmp */
#define ICMP_KIND_NONE 0 /* not ICMP, or an ICMP type that is neither below */
#define ICMP_KIND_ECHO_REQUEST 1
#define ICMP_KIND_ECHO_REPLY 2
#define ICMP_KIND_ERROR 3

/* The wire layouts we read, without bitfields. */
struct ipv4_hdr {
	__u8 version_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct ipv6_hdr {
	__be32 version_class_flow;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__be32 saddr[4];
	__be32 daddr[4];
};

struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in 8-byte units << 3 | M */
	__be32 id;
};

#define IPV4_MF 0x2000
#define IPV4_OFFSET 0x1fff
#define IPV6_FRAG_OFFSET 0xfff8
#define IPV6_FRAG_MF 0x0001

/* A flow as conntrack and policy see it. Addresses are 16 bytes in network
 * order, IPv4 mapped into ::ffff:0:0/96; ports in network order. */
struct trellis_tuple {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
};

struct trellis_pkt {
	struct trellis_tuple t;
	__u32 l4_off; /* start of the L4 header (of the ICMP header for errors) */
	__u32 frag_id;
	__u8 family; /* TRELLIS_FAMILY_IPV4 or _IPV6 */
	__u8 ports;  /* TCP, UDP or SCTP: sport and dport are real ports */
	__u8 frag;
	__u8 frag_proto; /* the protocol field fragments are grouped by */
	__u8 tcp_flags;
	__u8 icmp;
};

static __always_inline void ipv4_mapped(__be32 out[4], __be32 addr)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = bpf_htonl(0x0000ffff);
	out[3] = addr;
}

static __always_inline int is_ipv4_mapped(const __be32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int is_ipv6_exthdr(__u8 nexthdr)
{
	return nexthdr == NEXTHDR_HOP || nexthdr == NEXTHDR_ROUTING ||
	       nexthdr == NEXTHDR_FRAGMENT || nexthdr == NEXTHDR_AUTH ||
	       nexthdr == NEXTHDR_DEST;
}

/*
 * Walks the extension headers from *off, leaving *off and *nexthdr on the
 * upper-layer header. A fragment header fills the fragment fields of *p
 * and stops the walk at a later fragment (which has no upper-layer header).
 * ESP, "no next header" and unknown headers end the walk like a protocol:
 * they have no ports, so only any-protocol entries can match them.
 * Returns -1 when the chain is longer than TRELLIS_MAX_EXTHDRS or cut short.
 */
static __always_inline int skip_ipv6_exthdrs(struct __sk_buff *skb, __u32 *off, __u8 *nexthdr,
					     struct trellis_pkt *p)
{
	for (int i = 0; i < TRELLIS_MAX_EXTHDRS; i++) {
		__u8 nh = *nexthdr;

		if (nh == NEXTHDR_FRAGMENT) {
			struct ipv6_frag_hdr f;
			__u16 frag_off;

			if (bpf_skb_load_bytes(skb, *off, &f, sizeof(f)))
				return -1;
			frag_off = bpf_ntohs(f.frag_off);
			*nexthdr = f.nexthdr;
			*off += sizeof(f);
			/* An atomic fragment (offset 0, no M) is a whole datagram. */
			if (frag_off & (IPV6_FRAG_OFFSET | IPV6_FRAG_MF)) {
				p->frag = (frag_off & IPV6_FRAG_OFFSET) ? FRAG_LATER : FRAG_FIRST;
				p->frag_id = f.id;
				p->frag_proto = f.nexthdr;
			}
			if (p->frag == FRAG_LATER)
				return 0;
		} else if (nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_DEST ||
			   nh == NEXTHDR_AUTH) {
			__u8 h[2]; /* next header, length */

			if (bpf_skb_load_bytes(skb, *off, h, sizeof(h)))
				return -1;
			*nexthdr = h[0];
			/* AH counts 4-byte units minus 2, the others 8-byte units minus 1. */
			if (nh == NEXTHDR_AUTH)
				*off += ((__u32)h[1] + 2) * 4;
			else
				*off += ((__u32)h[1] + 1) * 8;
		} else {
			return 0;
		}
	}
	return is_ipv6_exthdr(*nexthdr) ? -1 : 0;
}

/* Bytes of the L4 header we read, 0 for none: TCP 20 (8 of a quoted
 * one), UDP 8, SCTP's common header 12 (8 quoted), ICMP of the packet's
 * family 8 (type, code, checksum, then an echo's identifier and sequence).
 * ICMP in IPv6 or ICMPv6 in IPv4 is just another protocol. */
static __always_inline __u32 l4_len(const struct trellis_pkt *p, int inner)
{
	switch (p->t.proto) {
	case IPPROTO_TCP:
		return inner ? 8 : 20;
	case IPPROTO_UDP:
		return 8;
	case IPPROTO_SCTP:
		return inner ? 8 : 12;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if ((p->t.proto == IPPROTO_ICMP) != (p->family == TRELLIS_FAMILY_IPV4))
			return 0;
		return 8;
	}
	/* Another protocol: no ports, tracked and matched by addresses. */
	return 0;
}

/* Fills sport/dport (and TCP flags, ICMP kind) from h, the first l4_len()
 * bytes of the L4 header (nothing is read when that is 0).
 * inner: the header is the 8 bytes an ICMP error quotes, not a whole one. */
static __always_inline int l4_fill(const __u8 *h, struct trellis_pkt *p, int inner)
{
	__u8 type;

	if (!l4_len(p, inner))
		return 0;
	switch (p->t.proto) {
	case IPPROTO_TCP:
		if (!inner) {
			/* data offset: at least the 5 words read */
			if ((h[12] >> 4) < 5)
				return -1;
			p->tcp_flags = h[13];
		}
		break;
	case IPPROTO_UDP:
	case IPPROTO_SCTP: /* ports first, like the others */
		break;
	default: /* ICMP of the packet's family */
		type = h[0];
		if (p->t.proto == IPPROTO_ICMP) {
			if (type == ICMP_ECHO)
				p->icmp = ICMP_KIND_ECHO_REQUEST;
			else if (type == ICMP_ECHOREPLY)
				p->icmp = ICMP_KIND_ECHO_REPLY;
			else if (type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
				 type == ICMP_PARAMETERPROB)
				p->icmp = ICMP_KIND_ERROR;
		} else {
			if (type == ICMPV6_ECHO_REQUEST)
				p->icmp = ICMP_KIND_ECHO_REQUEST;
			else if (type == ICMPV6_ECHO_REPLY)
				p->icmp = ICMP_KIND_ECHO_REPLY;
			else if (type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB)
				p->icmp = ICMP_KIND_ERROR;
		}
		/* Echo is tracked by its identifier, used as both ports (0004). */
		if (p->icmp == ICMP_KIND_ECHO_REQUEST || p->icmp == ICMP_KIND_ECHO_REPLY) {
			__builtin_memcpy(&p->t.sport, &h[4], 2);
			p->t.dport = p->t.sport;
		}
		return 0;
	}
	__builtin_memcpy(&p->t.sport, &h[0], 2);
	__builtin_memcpy(&p->t.dport, &h[2], 2);
	p->ports = 1;
	return 0;
}

/* Checks the IPv4 header ip and fills p from it: its length, or -1. */
static __always_inline int ipv4_fill(const struct ipv4_hdr *ip, struct trellis_pkt *p, int inner)
{
	__u32 hlen = (__u32)(ip->version_ihl & 0x0f) * 4;
	__u16 frag_off;

	if ((ip->version_ihl >> 4) != 4 || hlen < sizeof(*ip))
		return -1;
	/* tot_len 0 is what IPv4 BIG TCP puts in packets over 64 KiB. */
	if (!inner && ip->tot_len && bpf_ntohs(ip->tot_len) < hlen)
		return -1;
	ipv4_mapped(p->t.saddr, ip->saddr);
	ipv4_mapped(p->t.daddr, ip->daddr);
	p->t.proto = ip->protocol;
	frag_off = bpf_ntohs(ip->frag_off);
	if (frag_off & (IPV4_MF | IPV4_OFFSET)) {
		p->frag = (frag_off & IPV4_OFFSET) ? FRAG_LATER : FRAG_FIRST;
		p->frag_id = ip->id;
		p->frag_proto = ip->protocol;
	}
	return hlen;
}

/* Checks the fixed IPv6 header ip6 and fills p's addresses from it. */
static __always_inline int ipv6_fill(const struct ipv6_hdr *ip6, struct trellis_pkt *p, int inner)
{
	if ((bpf_ntohl(ip6->version_class_flow) >> 28) != 6)
		return -1;
	/* Invalid on the wire (RFC 4291 2.5.5.2; Linux drops them on
	 * receive), and here they would alias IPv4 conntrack keys. */
	if (!inner && (is_ipv4_mapped(ip6->saddr) || is_ipv4_mapped(ip6->daddr)))
		return -1;
	__builtin_memcpy(p->t.saddr, ip6->saddr, 16);
	__builtin_memcpy(p->t.daddr, ip6->daddr, 16);
	return 0;
}

/* The L4 header at off (nothing for a later fragment). */
static __always_inline int parse_l4(struct __sk_buff *skb, __u32 off, struct trellis_pkt *p,
				    int inner)
{
	__u8 h[20];
	__u32 len;

	p->l4_off = off;
	if (p->frag == FRAG_LATER)
		return 0;
	len = l4_len(p, inner);
	if (len > sizeof(h))
		return -1; /* never: for the verifier */
	if (len && bpf_skb_load_bytes(skb, off, h, len))
		return -1;
	return l4_fill(h, p, inner);
}

/* The IP header at off and what follows it, each header copied by the
 * helper. inner: the packet quoted in an ICMP error (the same family as
 * the error). */
static __always_inline int parse_l3(struct __sk_buff *skb, __u32 off, __u8 family,
				    struct trellis_pkt *p, int inner)
{
	p->family = family;
	if (family == TRELLIS_FAMILY_IPV4) {
		struct ipv4_hdr ip;
		int hlen;

		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
			return -1;
		hlen = ipv4_fill(&ip, p, inner);
		if (hlen < 0)
			return -1;
		off += hlen;
	} else {
		struct ipv6_hdr ip6;
		__u8 nexthdr;

		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
			return -1;
		if (ipv6_fill(&ip6, p, inner))
			return -1;
		off += sizeof(ip6);
		nexthdr = ip6.nexthdr;
		if (skip_ipv6_exthdrs(skb, &off, &nexthdr, p))
			return -1;
		p->t.proto = nexthdr;
	}
	return parse_l4(skb, off, p, inner);
}

/* Bytes after the IP header the direct path wants in the linear area: the
 * longest l4_len(). */
#define TRELLIS_L4_MAX 20

/*
 * The common packet without a helper call: IPv4 without options, or IPv6
 * whose next header is no extension header, with TRELLIS_L4_MAX bytes after
 * the IP header in the linear area (a veth hands over nearly every packet
 * so). The same checks and fills as parse_l3(), read in place; every call
 * and return costs extra under the kernel's speculation mitigations, and
 * this saves two helper calls (each with a memcpy) per packet.
 * 1 when it parsed the packet, 0 when the general path must (nothing in p
 * is left that parse_l3() does not set again), -1 for malformed.
 */
static __always_inline int parse_direct(struct __sk_buff *skb, __u8 family, struct trellis_pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u8 *l4;
	__u32 l4_off;

	p->family = family;
	if (family == TRELLIS_FAMILY_IPV4) {
		const struct ipv4_hdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) + TRELLIS_L4_MAX > data_end || ip->version_ihl != 0x45)
			return 0;
		if (ipv4_fill(ip, p, 0) < 0)
			return -1;
		l4 = (const __u8 *)(ip + 1);
		l4_off = ETH_HLEN + sizeof(*ip);
	} else {
		const struct ipv6_hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) + TRELLIS_L4_MAX > data_end || is_ipv6_exthdr(ip6->nexthdr))
			return 0;
		if (ipv6_fill(ip6, p, 0))
			return -1;
		p->t.proto = ip6->nexthdr;
		l4 = (const __u8 *)(ip6 + 1);
		l4_off = ETH_HLEN + sizeof(*ip6);
	}
	p->l4_off = l4_off;
	if (p->frag == FRAG_LATER)
		return 1;
	return l4_fill(l4, p, 0) ? -1 : 1;
}

/* The packet, from its Ethernet header's protocol on. build.rs also builds
 * the programs with TRELLIS_HELPER_READS, where every packet takes the
 * general path, so that the tests check that path on the packets the
 * direct one takes in practice (BPF_PROG_TEST_RUN only makes linear ones). */
static __always_inline int parse_packet(struct __sk_buff *skb, __u16 eth_proto,
					struct trellis_pkt *p)
{
	__u8 family = eth_proto == ETH_P_IP ? TRELLIS_FAMILY_IPV4 : TRELLIS_FAMILY_IPV6;
#ifndef TRELLIS_HELPER_READS
	int direct = parse_direct(skb, family, p);

	if (direct)
		return direct < 0 ? -1 : 0;
#endif
	return parse_l3(skb, ETH_HLEN, family, p, 0);
}

/* The Ethernet header's protocol field, in network order. */
static __always_inline int eth_proto_of(struct __sk_buff *skb, __be16 *proto)
{
#ifndef TRELLIS_HELPER_READS
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + ETH_HLEN <= data_end) {
		*proto = *(__be16 *)(data + 12);
		return 0;
	}
#endif
	return bpf_skb_load_bytes(skb, 12, proto, sizeof(*proto));
}

/*
 * The packet an ICMP error quotes after its 8-byte header: its IP header
 * and at least the first 8 bytes of what followed (RFC 792, RFC 4443), so
 * its ports or echo identifier. Fails when it cannot name a flow: cut
 * short, a later fragment, or ICMP other than echo.
 */
static __always_inline int parse_quoted(struct __sk_buff *skb, const struct trellis_pkt *outer,
					struct trellis_pkt *q)
{
	if (parse_l3(skb, outer->l4_off + 8, outer->family, q, 1))
		return -1;
	if (q->frag == FRAG_LATER || q->icmp == ICMP_KIND_ERROR)
		return -1;
	if ((q->t.proto == IPPROTO_ICMP || q->t.proto == IPPROTO_ICMPV6) &&
	    q->icmp == ICMP_KIND_NONE)
		return -1;
	return 0;
}

#endif /* TRELLIS_PARSE_H */
