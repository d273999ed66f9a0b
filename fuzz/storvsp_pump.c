/*
 * StorVSP host pump against a hostile guest: the input writes the guest TX ring (EXECUTE_SRB
 * in-band or GPA-direct with fuzzed ranges, PFNs, CDBs, lengths, flags; other packet types;
 * raw bytes; index corruption) and guest RAM; the host pump (uvb_vsp_pump) serves it on a
 * small in-memory disk and the guest RX ring is drained between pumps.  Oracle: the pump
 * returns one of the host.h codes and never touches memory outside guest RAM (guard pages).
 */
#define _GNU_SOURCE
#include "common.h"

#include <sys/mman.h>
#include <unistd.h>

#define TXDS (16u << 10)
#define RXDS (16u << 10)
#define RAM_PAGES 16u
#define BASE_PFN 0x100u
#define DISK_BLOCKS 128u

static uint8_t *txm, *rxm, *ram;
static int disk_fd = -1;
static const uint8_t *disk_map;
static uint8_t scratch[64u << 10];
static struct uvb_pkt pkts[64];
static struct uvb_vsp vsp;
static struct uvb_vsp_disk disks[2];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!txm) {
        txm = fz_map(FZ_HDR + TXDS);
        rxm = fz_map(FZ_HDR + RXDS);
        ram = fz_map(RAM_PAGES * 4096u);
        disk_fd = memfd_create("fuzz-disk", 0);
        if (disk_fd < 0 || ftruncate(disk_fd, DISK_BLOCKS * 512u))
            abort();
        int32_t err;
        disk_map = uvb_vsp_map(disk_fd, DISK_BLOCKS * 512u, &err);
        vsp.ram = ram;
        vsp.ram_size = RAM_PAGES * 4096u;
        vsp.base_pfn = BASE_PFN;
        vsp.max_luns = 2;
        vsp.disks = disks;
        uvb_vsp_disk_attach(&vsp, 0, disk_fd, 9, DISK_BLOCKS, 0, 0, disk_map, disk_map ? DISK_BLOCKS * 512u : 0);
        uvb_vsp_disk_attach(&vsp, 1, disk_fd, 12, DISK_BLOCKS / 8, 1, 0, NULL, 0);
        uvb_vsp_set_ready(&vsp, 1);
    }
    struct fz f = {data, size};
    fz_ring_fresh(txm, TXDS);
    fz_ring_fresh(rxm, RXDS);
    struct uvb_ring gtx, grx, htx, hrx;  /* guest writes TX, reads RX; host the opposite */
    if (uvb_ring_attach(&gtx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_OUT) ||
        uvb_ring_attach(&grx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_IN) ||
        uvb_ring_attach(&htx, txm, FZ_HDR + TXDS, FZ_HDR, UVB_RING_IN) ||
        uvb_ring_attach(&hrx, rxm, FZ_HDR + RXDS, FZ_HDR, UVB_RING_OUT))
        __builtin_trap();
    struct uvb_host_notify notify;
    memset(&notify, 0, sizeof notify);
    struct uvb_host_irq irq;
    memset(&irq, 0, sizeof irq);
    irq.notify = &notify;
    irq.rx_header = rxm;
    uint32_t kick = 0;
    struct uvb_vsp_chan c;
    memset(&c, 0, sizeof c);
    c.vsp = &vsp;
    c.tx = &htx;
    c.rx = &hrx;
    c.irq = &irq;
    c.kick = &kick;
    c.scratch = scratch;
    c.scratch_len = sizeof scratch;
    c.max_pkts = 64;
    c.pkts = pkts;
    c.commit_every = fz_u8(&f) % 4;
    disks[0].slow = 0;

    for (int op = 0; op < 32 && fz_left(&f); op++) {
        switch (fz_u8(&f) % 7) {
        case 0: {                       /* guest: an SRB, in-band or GPA-direct */
            struct vstor_packet p;
            memset(&p, 0, sizeof p);
            uint8_t m = fz_u8(&f);
            p.operation = m & 0x80 ? fz_u8(&f) : VSTOR_OP_EXECUTE_SRB;
            p.flags = m & 0x40 ? fz_u32(&f) : VSTOR_FLAG_REQUEST_COMPLETION;
            struct vstor_srb *s = &p.u.srb;
            s->length = m & 0x20 ? fz_u16(&f) : VSTOR_SRB_LEN_V2;
            s->path_id = m & 0x10 ? fz_u8(&f) : 0;
            s->target_id = m & 0x10 ? fz_u8(&f) : 0;
            s->lun = fz_u8(&f) % 3;
            s->cdb_length = fz_u8(&f) % 18;
            s->data_in = fz_u8(&f) % 4;
            s->data_transfer_length = fz_u8(&f) & 1 ? fz_u32(&f) : (fz_u8(&f) % 9) * 512u;
            static const uint8_t ops[8] = {0x28, 0x2A, 0x88, 0x8A, 0x00, 0x35, 0x91, 0x12};
            s->payload[0] = m & 8 ? fz_u8(&f) : ops[fz_u8(&f) % 8];
            for (int i = 1; i < 16; i++)
                s->payload[i] = fz_u8(&f) & 1 ? fz_u8(&f) : 0;
            s->srb_flags = fz_u32(&f);
            uint16_t fl = fz_u8(&f) & 1;
            if (m & 4) {
                struct uvb_gpa g[2] = {{fz_u32(&f), fz_u16(&f) % 4608}, {fz_u16(&f), fz_u16(&f) % 4608}};
                uint64_t pfns[6];
                uint32_t np = fz_u8(&f) % 7;
                for (uint32_t i = 0; i < np; i++)
                    pfns[i] = fz_u8(&f) & 1 ? fz_u64(&f) : BASE_PFN + fz_u8(&f) % (RAM_PAGES + 2);
                struct uvb_iov iov = {&p, sizeof p};
                uvb_out_gpa_direct(&gtx, fl, fz_u16(&f), g, fz_u8(&f) % 2 + 1, pfns, np, &iov, 1);
            } else {
                uint8_t big[96] = {0};    /* a packet longer than a VSTOR packet, too */
                memcpy(big, &p, sizeof p);
                uvb_out_inband(&gtx, VMBUS_PKT_INBAND, fl, fz_u16(&f), big,
                               m & 2 ? fz_u8(&f) % sizeof big : (uint32_t)sizeof p);
            }
            uvb_out_commit(&gtx);
            break;
        }
        case 1: {                       /* guest: another packet type or raw payload */
            uint32_t n;
            const uint8_t *b = fz_bytes(&f, fz_u8(&f) % 96, &n);
            uvb_out_inband(&gtx, fz_u16(&f), fz_u8(&f) & 1, fz_u16(&f), b, n);
            uvb_out_commit(&gtx);
            break;
        }
        case 2: {                       /* host pump */
            int rc = uvb_vsp_pump(&c);
            FZ_CHECK(rc == UVB_HOST_IDLE || rc == UVB_HOST_RXFULL || rc == UVB_HOST_SLOWPATH || rc < 0,
                     "pump returned an unknown code");
            if (rc == UVB_HOST_SLOWPATH) {  /* what the Python model would do: consume it */
                struct uvb_pkt k;
                static uint8_t one[TXDS];
                if (uvb_in_read(&htx, one, sizeof one, &k, 1) > 0)
                    uvb_in_commit(&htx);
            }
            break;
        }
        case 3: {                       /* guest drains its RX ring */
            static uint8_t buf[RXDS];
            struct uvb_pkt k[32];
            if (uvb_in_read(&grx, buf, sizeof buf, k, 32) > 0)
                uvb_in_commit(&grx);
            break;
        }
        case 4:
            fz_poke_index(&f, fz_u8(&f) & 1 ? rxm : txm);
            break;
        case 5: {                       /* guest writes its RAM (data of writes) */
            uint32_t off = fz_u16(&f) % (RAM_PAGES * 4096u);
            ram[off] = fz_u8(&f);
            break;
        }
        case 6:
            disks[0].slow = fz_u8(&f) & 1;
            break;
        }
    }
    return 0;
}
