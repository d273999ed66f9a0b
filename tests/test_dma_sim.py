"""Simulated guest RAM: file format, cross-process chunk allocation, host access by PFN."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from uvmbus.dma import (
    DEFAULT_BASE_PFN,
    DmaPool,
    GuestRam,
    HugepageMemory,
    SimGuestMemory,
    create_guest_ram,
    load_guest_ram_layout,
    open_dma_memory,
)
from uvmbus.dma.sim import ALLOC_RECORD, process_start_time
from uvmbus.errors import ConfigError, NotFound, ResourceError
from uvmbus.ring.ring import PKT_GPA_DIRECT, RingPair

CHUNK = 64 * 1024


def make_root(tmp_path: Path, size: int, base_pfn: int = DEFAULT_BASE_PFN) -> Path:
    create_guest_ram(tmp_path, size, base_pfn=base_pfn, chunk=CHUNK)
    return tmp_path


def table(root: Path) -> list[tuple[int, int, int]]:
    raw = (root / "sim" / "guest-ram.alloc").read_bytes()
    return [ALLOC_RECORD.unpack_from(raw, i) for i in range(0, len(raw), ALLOC_RECORD.size)]


def test_create_guest_ram_format(tmp_path: Path) -> None:
    lay = create_guest_ram(tmp_path, 5 * 1024 * 1024 + 1)     # rounded up to 2 MiB chunks
    assert lay.size == 6 * 1024 * 1024 and lay.chunk == 2 * 1024 * 1024
    meta = json.loads((tmp_path / "sim" / "guest-ram.json").read_text())
    assert meta == {"format": 1, "base_pfn": 0x100000, "size": lay.size, "chunk": 2097152}
    st = os.stat(tmp_path / "sim" / "guest-ram")
    assert st.st_size == lay.size and st.st_blocks * 512 < lay.size   # sparse
    assert table(tmp_path) == [(0, 0, 0)] * 3
    assert load_guest_ram_layout(tmp_path) == lay
    assert lay.end_pfn == 0x100000 + lay.size // 4096


def test_create_guest_ram_rejects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nonzero"):
        create_guest_ram(tmp_path, CHUNK, base_pfn=0, chunk=CHUNK)
    with pytest.raises(ConfigError, match="chunk"):
        create_guest_ram(tmp_path, CHUNK, chunk=1000)
    with pytest.raises(ConfigError):
        create_guest_ram(tmp_path, 0)
    assert not (tmp_path / "sim").exists()           # nothing created on bad arguments
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "guest-ram.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a guest RAM"):
        SimGuestMemory(tmp_path)


def test_open_dma_memory_selects_provider(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only available for root='/'"):
        open_dma_memory(tmp_path)
    make_root(tmp_path, CHUNK)
    mem = open_dma_memory(tmp_path)
    assert isinstance(mem, SimGuestMemory) and mem.kind == "sim"
    mem.close()
    try:
        real = open_dma_memory("/")
    except ResourceError:               # kernel without hugetlb
        return
    assert isinstance(real, HugepageMemory)


def test_missing_ram_file(tmp_path: Path) -> None:
    make_root(tmp_path, CHUNK)
    (tmp_path / "sim" / "guest-ram").unlink()
    with pytest.raises(NotFound):
        SimGuestMemory(tmp_path)


def test_region_layout_and_free_on_close(tmp_path: Path) -> None:
    root = make_root(tmp_path, 8 * CHUNK, base_pfn=0x345000)
    with SimGuestMemory(root) as mem, GuestRam(root) as ram:
        a = mem.alloc_region(CHUNK)
        b = mem.alloc_region(2 * CHUNK + 1)             # three chunks, contiguous
        assert b.size == 3 * CHUNK
        assert a.pfn_of(0) == 0x345000 and b.pfn_of(0) == 0x345000 + CHUNK // 4096
        assert [int(b.pfn_table[i]) for i in range(b.npages)] == \
            list(range(b.pfn_of(0), b.pfn_of(0) + b.npages))
        me = os.getpid()
        assert [r[0] for r in table(root)] == [me] * 4 + [0] * 4
        assert all(r[2] == process_start_time(me) for r in table(root)[:4])
        b.view[:5] = b"guest"
        b.view[-3:] = b"end"
        # the host finds the bytes at the PFN the guest was told about
        assert ram.read([b.pfn_of(0)], 0, 5) == b"guest"
        last = b.pfn_of(b.size - 1)
        assert ram.read([last], 4093, 3) == b"end"
        assert ram.view[ram.pfn_to_offset(b.pfn_of(0)):][:5] == b"guest"
        ram.write([a.pfn_of(8192)], 100, b"host")
        assert bytes(a.view[8192 + 100:8192 + 104]) == b"host"
        b.close()
        assert [r[0] for r in table(root)] == [me] + [0] * 7
        assert ram.read([last], 4093, 3) == bytes(3)       # zeroed when given back
        c = mem.alloc_region(3 * CHUNK)
        assert c.pfn_of(0) == b.pfn_of(0) and bytes(c.view[:5]) == bytes(5)
    assert table(root) == [(0, 0, 0)] * 8


def test_exhaustion_message(tmp_path: Path) -> None:
    root = make_root(tmp_path, 4 * CHUNK)
    with SimGuestMemory(root) as mem:
        mem.alloc_region(3 * CHUNK)
        with pytest.raises(ResourceError, match=rf"no 2 free contiguous chunks.*{os.getpid()}"):
            mem.alloc_region(2 * CHUNK)
        mem.alloc_region(CHUNK)


def test_two_instances_in_one_process_do_not_share(tmp_path: Path) -> None:
    root = make_root(tmp_path, 4 * CHUNK)
    m1, m2 = SimGuestMemory(root), SimGuestMemory(root)
    r1 = [m1.alloc_region(CHUNK) for _ in range(2)]
    r2 = [m2.alloc_region(CHUNK) for _ in range(2)]
    assert len({r.pfn_of(0) for r in r1 + r2}) == 4
    with pytest.raises(ResourceError):
        m2.alloc_region(CHUNK)
    m1.close()
    assert m2.alloc_region(2 * CHUNK).pfn_of(0) == DEFAULT_BASE_PFN
    m2.close()


CHILD = textwrap.dedent("""
    import json, os, struct, sys
    from uvmbus.dma import SimGuestMemory
    root, rounds, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    chunk = 64 * 1024
    mem = SimGuestMemory(root)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()                          # wait for "go"
    held, bad = [], []
    def tag(i):
        return struct.pack("<QQ", os.getpid(), i) * (chunk // 16)
    for i in range(rounds):
        r = mem.alloc_region(chunk * (1 + i % 2))
        r.view[:chunk] = tag(i)
        held.append((r, i))
        if i % 3 == 2:                           # churn: free the oldest
            old, j = held.pop(0)
            if bytes(old.view[:chunk]) != tag(j):
                bad.append(j)
            old.close()
    for r, i in held:
        if bytes(r.view[:chunk]) != tag(i):
            bad.append(i)
    print(json.dumps({"bad": bad, "pfns": [[r.pfn_of(0), r.size, i] for r, i in held]}))
    sys.stdout.flush()
    sys.stdin.readline()                          # hold the chunks until told
    if mode == "close":
        mem.close()
    os._exit(0)                                   # "crash": no cleanup at all
""")


def spawn(root: Path, rounds: int, mode: str = "close") -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(rounds), mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return p


def test_concurrent_processes_never_share_a_chunk(tmp_path: Path) -> None:
    root = make_root(tmp_path, 512 * CHUNK)
    kids = [spawn(root, 60) for _ in range(3)]
    for k in kids:                                 # start them all at once
        assert k.stdin is not None
        k.stdin.write("go\n")
        k.stdin.flush()
    results = []
    for k in kids:
        assert k.stdout is not None
        results.append(json.loads(k.stdout.readline()))
    owners: dict[int, int] = {}
    with GuestRam(root) as ram:
        for k, res in zip(kids, results, strict=True):
            assert res["bad"] == [], f"child {k.pid}: chunks overwritten by someone else"
            for pfn0, size, i in res["pfns"]:
                for page in range(pfn0, pfn0 + size // 4096, CHUNK // 4096):
                    assert page not in owners, f"chunk at {page:#x} held by two processes"
                    owners[page] = k.pid
                # the host reads each child's tag at the PFN the child reported
                assert ram.read([pfn0], 0, 16) == struct.pack("<QQ", k.pid, i)
        recorded = {i: pid for i, (pid, _, _) in enumerate(table(root)) if pid}
        assert recorded == {(p - DEFAULT_BASE_PFN) // (CHUNK // 4096): pid
                            for p, pid in owners.items()}
    for k in kids:
        assert k.stdin is not None
        k.stdin.write("done\n")
        k.stdin.flush()
        assert k.wait(30) == 0
    assert table(root) == [(0, 0, 0)] * 512


def test_dead_owner_chunks_are_reclaimed(tmp_path: Path) -> None:
    root = make_root(tmp_path, 8 * CHUNK)
    kid = spawn(root, 6, mode="crash")     # 6 rounds, 2 freed: holds 4 regions = 6 chunks
    assert kid.stdin is not None and kid.stdout is not None
    kid.stdin.write("go\n")
    kid.stdin.flush()
    assert json.loads(kid.stdout.readline())["bad"] == []
    assert sum(1 for r in table(root) if r[0] == kid.pid) == 6
    with SimGuestMemory(root) as mem:
        with pytest.raises(ResourceError, match=str(kid.pid)):
            mem.alloc_region(3 * CHUNK)          # the live owner keeps its chunks
        kid.stdin.write("done\n")
        kid.stdin.flush()
        assert kid.wait(30) == 0
        assert sum(1 for r in table(root) if r[0] == kid.pid) == 6   # never cleaned up
        whole = mem.alloc_region(8 * CHUNK)                          # ... but reclaimable
        assert bytes(whole.view) == bytes(8 * CHUNK)                 # and zeroed
        assert {r[0] for r in table(root)} == {os.getpid()}


def test_recycled_pid_is_not_the_owner(tmp_path: Path) -> None:
    root = make_root(tmp_path, 2 * CHUNK)
    me, start = os.getpid(), process_start_time(os.getpid())
    assert start
    with open(root / "sim" / "guest-ram.alloc", "r+b") as f:
        f.write(ALLOC_RECORD.pack(me, 0, start + 1))    # our PID, another process's start
        f.write(ALLOC_RECORD.pack(me, 0, start))        # really ours (another instance)
    with SimGuestMemory(root) as mem:
        r = mem.alloc_region(CHUNK)
        assert r.pfn_of(0) == DEFAULT_BASE_PFN
        with pytest.raises(ResourceError):
            mem.alloc_region(CHUNK)


def test_guest_ram_bounds(tmp_path: Path) -> None:
    root = make_root(tmp_path, 2 * CHUNK, base_pfn=0x1000)
    with GuestRam(root) as ram:
        assert (ram.base_pfn, ram.size, ram.end_pfn) == (0x1000, 2 * CHUNK, 0x1020)
        assert ram.pfn_to_offset(0x1000) == 0 and ram.pfn_to_offset(0x101F) == 0x1F000
        for pfn in (0, 0xFFF, 0x1020, 1 << 60):
            with pytest.raises(ConfigError, match=f"PFN {pfn:#x} is outside"):
                ram.pfn_to_offset(pfn)
        with pytest.raises(ConfigError, match=r"PFN 0x1020 \(entry 1\) is outside"):
            ram.read([0x101F, 0x1020], 4000, 200)          # crosses the end of RAM
        with pytest.raises(ConfigError, match=r"PFN 0xfff \(entry 0\)"):
            ram.write([0xFFF], 0, b"x")
        with pytest.raises(ConfigError, match="malformed"):
            ram.read([0x1000], 4096, 1)                    # byte_offset > 0xfff
        with pytest.raises(ConfigError, match="malformed"):
            ram.read([0x1000], 4000, 200)                  # needs two PFNs
        with pytest.raises(ConfigError, match="malformed"):
            ram.read([0x1000], 0, 0)
        ram.write([0x1005, 0x1001], 4090, b"0123456789")  # pages need not be contiguous
        assert ram.read([0x1005, 0x1001], 4090, 10) == b"0123456789"
        assert bytes(ram.view[0x5000 + 4090:0x6000]) == b"012345"
        assert bytes(ram.view[0x1000:0x1004]) == b"6789"
        buf = bytearray(10)
        ram.readinto([0x1005, 0x1001], 4090, buf)
        assert buf == b"0123456789"


def test_gpa_direct_packet_end_to_end(tmp_path: Path) -> None:
    """A buffer's gpa_range goes through a real ring; the host copies by the PFNs it parses."""
    root = make_root(tmp_path, 8 * CHUNK)
    ring_bytes = 16 * 4096
    mm = mmap.mmap(-1, 2 * ring_bytes)
    RingPair.init_memory(mm, ring_bytes)
    guest = RingPair.attach(mm, ring_bytes, 4096, role="guest")
    host = RingPair.attach(mm, ring_bytes, 4096, role="host")
    with SimGuestMemory(root) as mem, GuestRam(root) as ram:
        pool = DmaPool(mem, max_regions=1, align=8)
        pool.alloc(3000)                                   # push the next buffer off-page
        buf = pool.alloc(3 * 4096)
        data = os.urandom(9000)
        buf.view[5:9005] = data
        assert guest.out.put_gpa_direct([buf.gpa_range(5, 9000)], b"\x11" * 64, trans_id=7)
        guest.out.commit()
        pkt = host.inp.read_one()
        assert pkt is not None and pkt.type == PKT_GPA_DIRECT and pkt.trans_id == 7
        _reserved, nranges, count, offset = struct.unpack_from("<IIII", pkt.header, 0)
        npfn = -(-(offset + count) // 4096)
        pfns = list(struct.unpack_from(f"<{npfn}Q", pkt.header, 16))
        assert (nranges, count, offset) == (1, 9000, (3000 + 5) % 4096)
        assert ram.read(pfns, offset, count) == data
        pool.close()
    guest.out.close()
    guest.inp.close()
    host.out.close()
    host.inp.close()


def test_forked_child_closing_does_not_free_parent_chunks(tmp_path: Path) -> None:
    root = make_root(tmp_path, 2 * CHUNK)
    with SimGuestMemory(root) as mem:
        region = mem.alloc_region(CHUNK)
        region.view[:6] = b"parent"
        pid = os.fork()
        if pid == 0:                      # child: close what it inherited, then leave
            code = 0
            try:
                mem.close()
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(region.view[:6]) == b"parent"          # not zeroed by the child
        assert table(root)[0][0] == os.getpid()             # still ours
        with pytest.raises(ResourceError):
            SimGuestMemory(root).alloc_region(2 * CHUNK)
    assert table(root) == [(0, 0, 0)] * 2
