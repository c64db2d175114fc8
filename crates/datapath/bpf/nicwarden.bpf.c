// SPDX-License-Identifier: Apache-2.0
//
// nicwarden's eBPF datapath: two tc classifiers (clsact, direct action) on the node's fabric
// interface, deciding per packet from maps the agent writes. The Rust side is
// crates/datapath/src/ebpf/ (layout constants and structs in maps.rs must match).
//
// nw_egress (clsact egress) decides whether a packet may leave and which HTB class shapes it;
// HTB (installed by tc, see src/plan.rs) still shapes the rate. Per packet:
//   * ARP and nicwarden's link probes (EtherType 0x88B5: signed probes and answers, a few
//     per second, bounded by the agent): HTB class 1:2 (control), pass, not counted (only
//     they pass outside the scopes, as with the tc backend's filters), so interconnect
//     verification works whatever the leases say;
//   * IPv4: the destination is looked up in the LPM trie `nw_dst` -> scope slot (a miss is
//     slot 0, the egress scope); IPv6 and any other protocol: slot 0 (like the tc backend's
//     catch-all filter), so a blocked egress blocks them too;
//   * slot config `nw_config`: mode BLOCKED (0, also an unwritten slot: fail closed) drops and
//     counts; mode LEASE (1) charges the packet to the slot's exact volume counter `nw_used`
//     and drops it if it would cross `volume_limit`; LEASE and FLOOR (2) then count the packet
//     as passed and steer it to the slot's HTB class through skb->priority (HTB's classify
//     honours a priority naming one of its leaf classes; a class that does not exist falls to
//     HTB's default class, which drops: fail closed).
//
// nw_ingress (clsact ingress) polices what arrives from the peers, so that a node without an
// agent (or with a lying one) cannot push more at this node than this node's lease for that
// scope accepts. Per packet:
//   * anything but IPv4 (ARP, link probes, a switch's LLDP, and IPv6 or other protocols,
//     which the fabric does not carry for nicwarden): passes, not counted;
//   * IPv4: the *source* is looked up in the same trie `nw_dst` (a peer scope's prefixes are
//     that peer's addresses; a miss is slot 0, the egress scope);
//   * mode BLOCKED (or unknown): drop and count (a node without a valid lease has no fabric
//     traffic in either direction); LEASE and FLOOR: the slot's token bucket `nw_police`
//     (rate and burst written by the agent: the scope's lease or floor rate and its HTB
//     burst) admits the packet or drops it (counted as policed). No volume is charged: the
//     volume is what this node sends.
//
// Both programs also count per peer node, for byte conservation between nodes whatever the
// scopes: the peer address (destination at egress, source at ingress) is looked up in the LPM
// trie `nw_peer` -> peer index, and the packet is added to that index of `nw_peer_stats`:
// at egress as tx when it passes (only at the final TC_ACT_OK), at ingress as rx when it is
// admitted and as rx_dropped when the program drops it. Non-IPv4 frames are not counted.
// `nw_peer_node` (index -> node name) is the agent's alone; no program reads it.
//
// Lengths are IP packet lengths (IPv4 total length; for IPv6, for an IPv4 header whose total
// length is 0 as with BIG TCP, and for non-IP frames: skb->len minus the Ethernet header), so
// the figures match the nftables backend, which counts IP bytes. A GSO/GRO super-packet is one
// packet of its full length, as in nftables.
//
// Lookup cost does not depend on the number of scopes: one LPM lookup (bounded by the 32
// bits of an address) and three array lookups per packet and direction, plus one LPM lookup
// in nw_peer and one array lookup for the per-peer counters.

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Keep in sync with src/ebpf/maps.rs.
#define NW_SLOTS 1024
#define NW_DST_MAX 65536
#define NW_PEERS 1024
#define NW_PEER_ADDRS_MAX 4096
#define NW_PEER_NAME_LEN 64

// Token bucket bounds (see nw_police_admit): rates below 2^39 B/s (4.398 Tbit/s; the agent
// accepts at most 4 Tbit/s) keep `elapsed_us * rate` below 2^63 for any elapsed time under
// NW_REFILL_FULL_US, after which the bucket is full whatever it held (bursts are at most
// 10 s of the rate).
#define NW_RATE_MAX ((1ULL << 39) - 1)
#define NW_BURST_MAX (1ULL << 62)
#define NW_REFILL_FULL_US 16000000ULL

#define NW_MODE_BLOCKED 0
#define NW_MODE_LEASE 1
#define NW_MODE_FLOOR 2

// HTB class 1:2, the control class of the tc layout.
#define NW_CONTROL_CLASSID 0x00010002
// EtherType of nicwarden's link probes (crates/proto/src/link.rs LINK_ETHERTYPE).
#define NW_ETH_P_LINK 0x88B5

struct nw_dst_key {
	__u32 prefixlen;
	__u32 addr; // network byte order
};

struct nw_config {
	__u32 mode;
	__u32 classid;
	__u64 lease_id;
	__u64 volume_limit;
};

struct nw_stats {
	__u64 bytes;
	__u64 packets;
	__u64 volume_drops;
	__u64 blocked_drops;
};

struct nw_used {
	__u64 used;
};

// Per-slot token bucket of the ingress policer. The agent writes rate and burst with a full
// bucket (tokens = burst, last_ns = 0, frac = 0); the program keeps the rest.
struct nw_police {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 rate;    // bytes per second; 0: nothing passes (fail closed)
	__u64 burst;   // bytes
	__s64 tokens;  // bytes; below 0 after a packet larger than the burst (a debt)
	__u64 last_ns; // bpf_ktime_get_ns() up to which the bucket is refilled (whole microseconds)
	__u64 frac;    // refill remainder, in millionths of a byte
};

struct nw_istats {
	__u64 bytes; // IP bytes admitted
	__u64 packets;
	__u64 policed_drops;
	__u64 blocked_drops;
};

// Per peer index, per CPU. IP bytes.
struct nw_peer_stats {
	__u64 tx_bytes; // passed by nw_egress towards the peer
	__u64 tx_packets;
	__u64 rx_bytes; // admitted by nw_ingress from the peer
	__u64 rx_packets;
	__u64 rx_dropped_bytes; // dropped by nw_ingress (blocked, policed)
	__u64 rx_dropped_packets;
};

// The node a peer index counts (NUL-padded; all zeroes: free). Written and read by the agent.
struct nw_peer_node {
	char node[NW_PEER_NAME_LEN];
};

_Static_assert(sizeof(struct nw_config) == 24, "nw_config layout (maps.rs ScopeConfig)");
_Static_assert(sizeof(struct nw_stats) == 32, "nw_stats layout (maps.rs ScopeStats)");
_Static_assert(sizeof(struct nw_police) == 48, "nw_police layout (maps.rs Police)");
_Static_assert(sizeof(struct nw_istats) == 32, "nw_istats layout (maps.rs IngressStats)");
_Static_assert(sizeof(struct nw_peer_stats) == 48, "nw_peer_stats layout (maps.rs PeerStats)");
_Static_assert(sizeof(struct nw_peer_node) == 64, "nw_peer_node layout (maps.rs PEER_NAME_SIZE)");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NW_DST_MAX);
	__type(key, struct nw_dst_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_dst SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_used);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_used SEC(".maps");

// Ingress: one token bucket per slot, shared by all CPUs (a spin lock guards it; the value
// has BTF, which the lock needs).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_police);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_police SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NW_SLOTS);
	__type(key, __u32);
	__type(value, struct nw_istats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_istats SEC(".maps");

// Peer address (same key as nw_dst) -> peer index.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, NW_PEER_ADDRS_MAX);
	__type(key, struct nw_dst_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NW_PEERS);
	__type(key, __u32);
	__type(value, struct nw_peer_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_peer_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NW_PEERS);
	__type(key, __u32);
	__type(value, struct nw_peer_node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nw_peer_node SEC(".maps");

// The part of the IPv4 header we read.
struct nw_ipv4 {
	__u8 version_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__be16 check;
	__be32 saddr;
	__be32 daddr;
};

// Reads the IPv4 header after the Ethernet one: sets `slot` to the scope of the peer address
// (the destination, or with `by_saddr` the source) when nw_dst holds it, `len` to the IP
// total length when it is not 0, and `peer` to the per-peer counters of that address when
// nw_peer holds it. Leaves them as they are if the header cannot be read.
static __always_inline void nw_classify_ipv4(struct __sk_buff *skb, int by_saddr, __u32 *slot,
					     __u64 *len, struct nw_peer_stats **peer)
{
	struct nw_ipv4 ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) != 0)
		return;
	struct nw_dst_key key = { .prefixlen = 32, .addr = by_saddr ? ip.saddr : ip.daddr };
	__u32 *found = bpf_map_lookup_elem(&nw_dst, &key);
	__u16 tot_len = bpf_ntohs(ip.tot_len);
	if (found)
		*slot = *found;
	if (tot_len != 0)
		*len = tot_len;
	__u32 *index = bpf_map_lookup_elem(&nw_peer, &key);
	if (index)
		*peer = bpf_map_lookup_elem(&nw_peer_stats, index);
}

SEC("classifier")
int nw_egress(struct __sk_buff *skb)
{
	__u32 slot = 0;
	__u64 len = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;
	struct nw_peer_stats *peer = NULL;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		nw_classify_ipv4(skb, 0, &slot, &len, &peer);
	} else if (skb->protocol == bpf_htons(ETH_P_ARP) ||
		   skb->protocol == bpf_htons(NW_ETH_P_LINK)) {
		skb->priority = NW_CONTROL_CLASSID;
		return TC_ACT_OK;
	}

	struct nw_config *cfg = bpf_map_lookup_elem(&nw_config, &slot);
	struct nw_stats *stats = bpf_map_lookup_elem(&nw_stats, &slot);
	if (!cfg || !stats)
		return TC_ACT_SHOT; // a slot outside the maps: fail closed

	if (cfg->mode == NW_MODE_LEASE) {
		struct nw_used *used = bpf_map_lookup_elem(&nw_used, &slot);
		if (!used)
			return TC_ACT_SHOT;
		// Exact across CPUs: reserve the bytes, give them back if they do not fit. Nothing
		// beyond the limit ever passes; two packets racing at the very edge may both be
		// dropped where one would have fitted (fail closed).
		__u64 old = __sync_fetch_and_add(&used->used, len);
		if (old + len > cfg->volume_limit) {
			__sync_fetch_and_add(&used->used, -len);
			stats->volume_drops += 1;
			return TC_ACT_SHOT;
		}
	} else if (cfg->mode != NW_MODE_FLOOR) {
		// NW_MODE_BLOCKED, and any unknown mode: fail closed.
		stats->blocked_drops += 1;
		return TC_ACT_SHOT;
	}

	// Per-CPU values; tc runs with bottom halves disabled, so no other program instance
	// touches this CPU's copy meanwhile.
	stats->bytes += len;
	stats->packets += 1;
	// Per peer: only what actually passes (per-CPU, as above).
	if (peer) {
		peer->tx_bytes += len;
		peer->tx_packets += 1;
	}
	skb->priority = cfg->classid;
	return TC_ACT_OK;
}

// Refills the bucket up to `now` and takes `len` bytes from it if they fit. Returns 1 to
// admit. The refill is exact: time is consumed in whole microseconds (the rest stays for the
// next packet) and the sub-byte part of the refill is carried in `frac`, so the long-run
// admitted rate is the configured one to the byte. A packet larger than the burst (a GRO
// super-packet on a small burst) passes only on a full bucket and leaves it in debt, so the
// rate still holds on average. (src/ebpf/maps.rs `Police::admit` is the same in Rust; keep
// the two in step.) No helper calls inside the lock: `now` is read before it.
static __always_inline int nw_police_admit(struct nw_police *p, __u64 len, __u64 now)
{
	int admit = 0;

	bpf_spin_lock(&p->lock);
	__u64 rate = p->rate > NW_RATE_MAX ? NW_RATE_MAX : p->rate;
	__s64 burst = (__s64)(p->burst > NW_BURST_MAX ? NW_BURST_MAX : p->burst);
	if (now > p->last_ns) {
		__u64 us = (now - p->last_ns) / 1000;
		if (us >= NW_REFILL_FULL_US) {
			p->tokens = burst;
			p->frac = 0;
			p->last_ns = now;
		} else if (us > 0) {
			__u64 num = us * rate + p->frac;
			__s64 tokens = p->tokens + (__s64)(num / 1000000);
			p->frac = num % 1000000;
			p->last_ns += us * 1000;
			if (tokens >= burst) {
				tokens = burst;
				p->frac = 0;
			}
			p->tokens = tokens;
		}
	}
	__s64 need = (__s64)len < burst ? (__s64)len : burst;
	if (rate != 0 && p->tokens >= need) {
		p->tokens -= (__s64)len;
		admit = 1;
	}
	bpf_spin_unlock(&p->lock);
	return admit;
}

SEC("classifier")
int nw_ingress(struct __sk_buff *skb)
{
	// Only IPv4 is policed: ARP, link probes and LLDP must work whatever the leases say,
	// and the fabric carries nicwarden's traffic as IPv4.
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;

	// At clsact ingress skb->data is at the MAC header for a tc program, as at egress.
	__u32 slot = 0;
	__u64 len = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;
	struct nw_peer_stats *peer = NULL;
	nw_classify_ipv4(skb, 1, &slot, &len, &peer);
	__u64 now = bpf_ktime_get_ns();

	// Per-CPU values, as at egress (tc ingress runs with bottom halves disabled). Every drop
	// below is counted against the peer as rx_dropped, every admission as rx.
	struct nw_config *cfg = bpf_map_lookup_elem(&nw_config, &slot);
	struct nw_istats *stats = bpf_map_lookup_elem(&nw_istats, &slot);
	struct nw_police *police = bpf_map_lookup_elem(&nw_police, &slot);
	if (!cfg || !stats || !police)
		goto drop; // a slot outside the maps: fail closed

	if (cfg->mode != NW_MODE_LEASE && cfg->mode != NW_MODE_FLOOR) {
		// NW_MODE_BLOCKED, and any unknown mode: fail closed.
		stats->blocked_drops += 1;
		goto drop;
	}
	if (!nw_police_admit(police, len, now)) {
		stats->policed_drops += 1;
		goto drop;
	}
	stats->bytes += len;
	stats->packets += 1;
	if (peer) {
		peer->rx_bytes += len;
		peer->rx_packets += 1;
	}
	return TC_ACT_OK;

drop:
	if (peer) {
		peer->rx_dropped_bytes += len;
		peer->rx_dropped_packets += 1;
	}
	return TC_ACT_SHOT;
}

// No GPL-only helpers are used.
char LICENSE[] SEC("license") = "Apache-2.0";
