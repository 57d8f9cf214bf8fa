#!/usr/bin/env python3
"""Medians, ratios and a chart from bench-net.sh's RESULT lines.

RESULT <system> <vcpus> GUEST-TO-PEER|PEER-TO-GUEST [ 5] ... <rate> Mbits/sec ... receiver
"""
import re
import statistics
import sys
from collections import defaultdict

raw, out = sys.argv[1], sys.argv[2]
rates = defaultdict(list)  # (system, vcpus, direction) -> [Mbit/s]
pattern = re.compile(r"^RESULT (\S+) (\d+) (GUEST-TO-PEER|PEER-TO-GUEST) .*?([\d.]+) ([KMG])bits/sec")
scale = {"K": 1e-3, "M": 1.0, "G": 1e3}
with open(raw) as f:
    for line in f:
        m = pattern.match(line)
        if m:
            system, vcpus, direction, value, unit = m.groups()
            rates[(system, int(vcpus), direction)].append(float(value) * scale[unit])
if not rates:
    sys.exit("bench-net: no results (see the output above)")

systems = sorted({k[0] for k in rates}, key=lambda s: (not s.startswith("xskvm"), s))
ours = [s for s in systems if s.startswith("xskvm")]
cpus = sorted({k[1] for k in rates})
directions = ["GUEST-TO-PEER", "PEER-TO-GUEST"]


def median(system, v, d):
    r = rates.get((system, v, d), [])
    return (statistics.median(r) if r else float("nan")), len(r)


lines = ["iperf3 TCP, Mbit/s: median of rounds (rounds run); then each xskvm set-up / each other system"]
for v in cpus:
    for d in directions:
        row = [f"{v} vCPU {d:14}"]
        for s in systems:
            med, n = median(s, v, d)
            row.append(f"{s} {med:7.1f} ({n})")
        lines.append("   ".join(row))
        for x in ours:
            xm, _ = median(x, v, d)
            ratios = [f"/ {s} {xm / median(s, v, d)[0]:.2f}x" for s in systems if s not in ours]
            lines.append(f"{'':21}{x} " + "  ".join(ratios))
text = "\n".join(lines)
print(text)
with open(f"{out}/results.txt", "w") as f:
    f.write(text + "\n")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("bench-net: python3-matplotlib missing: no chart")
groups = [(v, d) for v in cpus for d in directions]
width = 0.8 / len(systems)
fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2, 4.5))
for i, s in enumerate(systems):
    meds = [statistics.median(rates.get((s, v, d), [0])) for v, d in groups]
    ax.bar([g + i * width for g in range(len(groups))], meds, width, label=s)
ax.set_xticks([g + width * (len(systems) - 1) / 2 for g in range(len(groups))])
ax.set_xticklabels([f"{v} vCPU\n{d.lower()}" for v, d in groups])
ax.set_ylabel("iperf3 TCP, Mbit/s (median)")
ax.set_title("xskvm (AF_XDP) vs QEMU microvm + tap, same guest, same host")
ax.legend()
fig.tight_layout()
fig.savefig(f"{out}/chart.png", dpi=100)
print(f"chart: {out}/chart.png")
