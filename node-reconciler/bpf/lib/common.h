/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* What every policy header needs: kernel UAPI, libbpf's helpers, verdicts. */
#ifndef TRELLIS_COMMON_H
#define TRELLIS_COMMON_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "trellis_abi.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_IPV6 0x86DD

#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58
#define IPPROTO_SCTP 132

/*
 * Both attach modes read these the same way: TC_ACT_OK is TCX_PASS and
 * TC_ACT_SHOT is TCX_DROP. Passing is final on purpose: a program attached
 * after ours must not be able to pass what policy dropped, and what policy
 * passed needs no second opinion from us.
 */
#define TRELLIS_PASS TC_ACT_OK
#define TRELLIS_DROP TC_ACT_SHOT

#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

#endif /* TRELLIS_COMMON_H */
