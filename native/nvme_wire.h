/*
 * NVMe wire layouts (NVM Express Base Specification 2.0: submission/completion queue
 * entries, Identify data structures, DSM ranges, controller registers).  Read by the C
 * compiler and, packed, by cffi; the Python driver and the fast path use these only.
 */

/* controller registers (BAR0 offsets) */
#define UVB_NVME_REG_CAP     0x00   /* u64 */
#define UVB_NVME_REG_VS      0x08
#define UVB_NVME_REG_INTMS   0x0C
#define UVB_NVME_REG_INTMC   0x10
#define UVB_NVME_REG_CC      0x14
#define UVB_NVME_REG_CSTS    0x1C
#define UVB_NVME_REG_NSSR    0x20
#define UVB_NVME_REG_AQA     0x24
#define UVB_NVME_REG_ASQ     0x28   /* u64 */
#define UVB_NVME_REG_ACQ     0x30   /* u64 */
#define UVB_NVME_REG_DBS     0x1000 /* doorbells: SQy tail at 0x1000 + (2y)(4 << DSTRD) */

#define UVB_NVME_CC_EN       0x1
#define UVB_NVME_CC_SHN_NORMAL 0x4000
#define UVB_NVME_CSTS_RDY    0x1
#define UVB_NVME_CSTS_CFS    0x2
#define UVB_NVME_CSTS_SHST_MASK 0xC
#define UVB_NVME_CSTS_SHST_DONE 0x8

/* admin opcodes */
#define UVB_NVME_ADM_DELETE_SQ   0x00
#define UVB_NVME_ADM_CREATE_SQ   0x01
#define UVB_NVME_ADM_GET_LOG     0x02
#define UVB_NVME_ADM_DELETE_CQ   0x04
#define UVB_NVME_ADM_CREATE_CQ   0x05
#define UVB_NVME_ADM_IDENTIFY    0x06
#define UVB_NVME_ADM_ABORT       0x08
#define UVB_NVME_ADM_SET_FEATURES 0x09
#define UVB_NVME_ADM_GET_FEATURES 0x0A

/* NVM command set opcodes */
#define UVB_NVME_CMD_FLUSH       0x00
#define UVB_NVME_CMD_WRITE       0x01
#define UVB_NVME_CMD_READ        0x02
#define UVB_NVME_CMD_WRITE_ZEROES 0x08
#define UVB_NVME_CMD_DSM         0x09

/* Identify CNS values, feature ids */
#define UVB_NVME_CNS_NS          0x00
#define UVB_NVME_CNS_CTRL        0x01
#define UVB_NVME_CNS_NS_ACTIVE   0x02
#define UVB_NVME_FEAT_NUM_QUEUES 0x07

/* ONCS bits (Identify Controller) */
#define UVB_NVME_ONCS_DSM        0x4
#define UVB_NVME_ONCS_WRITE_ZEROES 0x8

struct uvb_nvme_sqe {
    uint8_t  opc;
    uint8_t  flags;          /* FUSE bits 1:0, PSDT bits 7:6 (0: PRPs) */
    uint16_t cid;
    uint32_t nsid;
    uint32_t cdw2;
    uint32_t cdw3;
    uint64_t mptr;
    uint64_t prp1;
    uint64_t prp2;
    uint32_t cdw10;
    uint32_t cdw11;
    uint32_t cdw12;
    uint32_t cdw13;
    uint32_t cdw14;
    uint32_t cdw15;
};

struct uvb_nvme_cqe {
    uint32_t dw0;
    uint32_t dw1;
    uint16_t sq_head;
    uint16_t sq_id;
    uint16_t cid;
    uint16_t status;         /* bit 0: phase tag; bits 15:1 status field */
};

struct uvb_nvme_dsm_range {
    uint32_t attributes;
    uint32_t nlb;
    uint64_t slba;
};

struct uvb_nvme_lbaf {
    uint16_t ms;
    uint8_t  lbads;
    uint8_t  rp;
};

struct uvb_nvme_id_ctrl {
    uint16_t vid;
    uint16_t ssvid;
    char     sn[20];
    char     mn[40];
    char     fr[8];
    uint8_t  rab;
    uint8_t  ieee[3];
    uint8_t  cmic;
    uint8_t  mdts;
    uint16_t cntlid;
    uint32_t ver;
    uint8_t  rsvd84[172];    /* 84..255 */
    uint16_t oacs;           /* 256 */
    uint8_t  acl;
    uint8_t  aerl;
    uint8_t  frmw;
    uint8_t  lpa;
    uint8_t  elpe;
    uint8_t  npss;
    uint8_t  rsvd264[248];   /* 264..511 */
    uint8_t  sqes;           /* 512 */
    uint8_t  cqes;
    uint16_t maxcmd;
    uint32_t nn;
    uint16_t oncs;           /* 520 */
    uint16_t fuses;
    uint8_t  fna;
    uint8_t  vwc;
    uint16_t awun;
    uint16_t awupf;
    uint8_t  icsvscc;
    uint8_t  nwpc;
    uint16_t acwu;
    uint16_t ocfs;
    uint32_t sgls;           /* 536 */
    uint32_t mnan;
    uint8_t  rsvd544[224];
    char     subnqn[256];    /* 768 */
    uint8_t  rsvd1024[3072];
};

struct uvb_nvme_id_ns {
    uint64_t nsze;
    uint64_t ncap;
    uint64_t nuse;
    uint8_t  nsfeat;
    uint8_t  nlbaf;
    uint8_t  flbas;
    uint8_t  mc;
    uint8_t  dpc;
    uint8_t  dps;
    uint8_t  nmic;
    uint8_t  rescap;
    uint8_t  fpi;
    uint8_t  dlfeat;
    uint16_t nawun;
    uint16_t nawupf;
    uint16_t nacwu;
    uint16_t nabsn;
    uint16_t nabo;
    uint16_t nabspf;
    uint16_t noiob;
    uint8_t  nvmcap[16];
    uint8_t  rsvd64[40];     /* 64..103 */
    uint8_t  nguid[16];      /* 104 */
    uint8_t  eui64[8];       /* 120 */
    struct uvb_nvme_lbaf lbaf[16];  /* 128 */
    uint8_t  rsvd192[3904];
};
