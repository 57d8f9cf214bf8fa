# Writes hand-made net_queues inputs in arbitrary 1.5's byte encoding (the
# op layout of fuzz_targets/net_queues.rs: update both together). Random
# inputs rarely reach VQ_PAIRS_SET with traffic on pair 1, or CTRL_RX.
# Usage: python3 fuzz/seeds/net_queues.py pairs|rxmode OUTPUT
import struct, sys
out = bytearray()
def irange(lo, hi, v, size=1):
    d = hi - lo; assert lo <= v <= hi
    n = 0
    while n < size and (d >> (8*n)) > 0: n += 1
    off = v - lo
    out.extend(off.to_bytes(n, 'big'))
def ratio(num, den, b): irange(1, den, 1 if b else den)
def u8(v): out.append(v)
def u16(v): out.extend(struct.pack('<H', v))
Q = 5
def op_head(q, kind, ctrl_redirect=None):
    irange(0, Q-1, q, 8); irange(0, 15, kind)
    if kind == 4: ratio(3, 4, True)
def rxbuf(q, length=2000):
    op_head(q, 0); irange(1, 3, 1)
    irange(0, 7, 0); irange(0, 2100, length, 4); ratio(7, 8, True); u16(0)
    ratio(1, 2, True)
def inject(pair, length=100):
    op_head(0, 10); irange(0, 1, pair, 8); ratio(7, 8, True); irange(14, 1600, length, 8)
def cmd_pairs(n):
    op_head(4, 4); irange(0, 9, 0); ratio(3, 4, True); irange(0, 4, n, 2); irange(0, 7, 7)
    cmd_tail()
def cmd_tail():
    irange(1, 3, 1); irange(0, 2, 1); irange(0, 2, 1, 4); ratio(1, 8, False); ratio(3, 4, True)
def cmd_promisc(on):
    op_head(4, 4); irange(0, 9, 4); irange(0, 1, 0); irange(0, 3, 1 if on else 0, 8); irange(0, 7, 7)
    cmd_tail()
def cmd_mac(uc, mc):
    op_head(4, 4); irange(0, 9, 6)
    for c in (uc, mc):
        irange(0, 7, 0); irange(0, 4, c, 4); u8(0x10 + c)
    irange(0, 7, 7); cmd_tail()
def tx(q, length=100, fill=0x42):
    op_head(q, 2); irange(0, 7, 0); irange(0, 2100, length, 4); u8(fill); u8(0); ratio(7, 8, True)
def kick(q): op_head(q, 8)
def settle(): op_head(0, 12)
def header():
    irange(1, 2, 2); irange(1, 64, 64); irange(0, 15, 1)
    ratio(1, 2, True)
    for q in range(Q):
        ratio(15, 16, True); irange(0, 8, 4, 4); u8(0); u8(0); u8(0)
    irange(0, 16, 0)
which = sys.argv[1]
header()
if which == 'pairs':
    rxbuf(0); rxbuf(2); rxbuf(2); inject(1); cmd_pairs(2); settle(); inject(1); inject(1); inject(0)
    tx(3); kick(3); tx(1); kick(1); settle(); cmd_pairs(1); settle(); inject(1); rxbuf(2); inject(1)
elif which == 'rxmode':
    cmd_promisc(True); cmd_mac(2, 3); settle(); cmd_promisc(False); cmd_mac(4, 1); cmd_pairs(2); rxbuf(2); inject(1)
open(sys.argv[2], 'wb').write(out)
