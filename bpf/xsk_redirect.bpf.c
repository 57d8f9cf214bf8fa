// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * xskvm's XDP program: a frame received on queue i goes to the AF_XDP
 * socket in xsks_map[i]; a frame on a queue without a socket goes on to
 * the kernel stack (the XDP_PASS fallback of bpf_redirect_map), so the
 * host keeps working on the queues xskvm does not own.
 *
 * The map size is set by the loader before load (one slot per device
 * queue); the value here is only the default.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks_map SEC(".maps");

SEC("xdp")
int xskvm_redirect(struct xdp_md *ctx)
{
	return bpf_redirect_map(&xsks_map, ctx->rx_queue_index, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
