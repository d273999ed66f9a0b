/*
 * VFIO userspace API layouts (linux include/uapi/linux/vfio.h, and iommufd.h for the
 * cdev path).  Read by the C compiler and, packed, by cffi: uvmbus.vfio builds its ioctl
 * arguments from these structs only.  Every struct here is naturally aligned in the
 * kernel header (no implicit padding), so packing does not change the layout.
 *
 * ioctl numbers are _IO(';', 100 + n): type 0x3B, no size or direction bits.
 */

#define UVB_VFIO_API_VERSION              0

#define UVB_VFIO_GET_API_VERSION          0x3B64   /* 100 */
#define UVB_VFIO_CHECK_EXTENSION          0x3B65   /* 101 */
#define UVB_VFIO_SET_IOMMU                0x3B66   /* 102 */
#define UVB_VFIO_GROUP_GET_STATUS         0x3B67   /* 103 */
#define UVB_VFIO_GROUP_SET_CONTAINER      0x3B68   /* 104 */
#define UVB_VFIO_GROUP_UNSET_CONTAINER    0x3B69   /* 105 */
#define UVB_VFIO_GROUP_GET_DEVICE_FD      0x3B6A   /* 106 */
#define UVB_VFIO_DEVICE_GET_INFO          0x3B6B   /* 107 */
#define UVB_VFIO_DEVICE_GET_REGION_INFO   0x3B6C   /* 108 */
#define UVB_VFIO_DEVICE_GET_IRQ_INFO      0x3B6D   /* 109 */
#define UVB_VFIO_DEVICE_SET_IRQS          0x3B6E   /* 110 */
#define UVB_VFIO_DEVICE_RESET             0x3B6F   /* 111 */
#define UVB_VFIO_IOMMU_GET_INFO           0x3B70   /* 112 (container fd) */
#define UVB_VFIO_IOMMU_MAP_DMA            0x3B71   /* 113 */
#define UVB_VFIO_IOMMU_UNMAP_DMA          0x3B72   /* 114 */
#define UVB_VFIO_DEVICE_BIND_IOMMUFD      0x3B76   /* 118 (cdev) */
#define UVB_VFIO_DEVICE_ATTACH_IOMMUFD_PT 0x3B77   /* 119 (cdev) */

/* VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU arguments */
#define UVB_VFIO_TYPE1_IOMMU              1
#define UVB_VFIO_TYPE1v2_IOMMU            3
#define UVB_VFIO_NOIOMMU_IOMMU            8

/* vfio_group_status.flags */
#define UVB_VFIO_GROUP_FLAGS_VIABLE       1
#define UVB_VFIO_GROUP_FLAGS_CONTAINER_SET 2

/* vfio_device_info.flags */
#define UVB_VFIO_DEVICE_FLAGS_RESET       1
#define UVB_VFIO_DEVICE_FLAGS_PCI         2

/* vfio_region_info.flags */
#define UVB_VFIO_REGION_INFO_FLAG_READ    1
#define UVB_VFIO_REGION_INFO_FLAG_WRITE   2
#define UVB_VFIO_REGION_INFO_FLAG_MMAP    4
#define UVB_VFIO_REGION_INFO_FLAG_CAPS    8

/* region capability ids (vfio_info_cap_header.id) */
#define UVB_VFIO_REGION_INFO_CAP_SPARSE_MMAP  1
#define UVB_VFIO_REGION_INFO_CAP_MSIX_MAPPABLE 3

/* PCI region and IRQ indexes */
#define UVB_VFIO_PCI_BAR0_REGION_INDEX    0
#define UVB_VFIO_PCI_ROM_REGION_INDEX     6
#define UVB_VFIO_PCI_CONFIG_REGION_INDEX  7
#define UVB_VFIO_PCI_INTX_IRQ_INDEX       0
#define UVB_VFIO_PCI_MSI_IRQ_INDEX        1
#define UVB_VFIO_PCI_MSIX_IRQ_INDEX       2
#define UVB_VFIO_PCI_ERR_IRQ_INDEX        3
#define UVB_VFIO_PCI_REQ_IRQ_INDEX        4

/* vfio_irq_info.flags */
#define UVB_VFIO_IRQ_INFO_EVENTFD         1
#define UVB_VFIO_IRQ_INFO_MASKABLE        2
#define UVB_VFIO_IRQ_INFO_AUTOMASKED      4
#define UVB_VFIO_IRQ_INFO_NORESIZE        8

/* vfio_irq_set.flags */
#define UVB_VFIO_IRQ_SET_DATA_NONE        1
#define UVB_VFIO_IRQ_SET_DATA_BOOL        2
#define UVB_VFIO_IRQ_SET_DATA_EVENTFD     4
#define UVB_VFIO_IRQ_SET_ACTION_MASK      8
#define UVB_VFIO_IRQ_SET_ACTION_UNMASK    16
#define UVB_VFIO_IRQ_SET_ACTION_TRIGGER   32

/* vfio_iommu_type1_dma_map.flags */
#define UVB_VFIO_DMA_MAP_FLAG_READ        1
#define UVB_VFIO_DMA_MAP_FLAG_WRITE       2

/* vfio_iommu_type1_info.flags */
#define UVB_VFIO_IOMMU_INFO_PGSIZES       1
#define UVB_VFIO_IOMMU_INFO_CAPS          2

/* cdev + iommufd (include/uapi/linux/vfio.h, iommufd.h): type ';' too */
#define UVB_IOMMU_DESTROY                 0x3B80
#define UVB_IOMMU_IOAS_ALLOC              0x3B81
#define UVB_IOMMU_IOAS_MAP                0x3B85
#define UVB_IOMMU_IOAS_UNMAP              0x3B86
#define UVB_IOMMU_IOAS_MAP_FIXED_IOVA     1
#define UVB_IOMMU_IOAS_MAP_WRITEABLE      2
#define UVB_IOMMU_IOAS_MAP_READABLE       4

struct vfio_device_bind_iommufd {
    uint32_t argsz;
    uint32_t flags;
    int32_t  iommufd;
    uint32_t out_devid;
};

struct vfio_device_attach_iommufd_pt {
    uint32_t argsz;
    uint32_t flags;
    uint32_t pt_id;
};

struct iommu_destroy {
    uint32_t size;
    uint32_t id;
};

struct iommu_ioas_alloc {
    uint32_t size;
    uint32_t flags;
    uint32_t out_ioas_id;
};

struct iommu_ioas_map {
    uint32_t size;
    uint32_t flags;
    uint32_t ioas_id;
    uint32_t reserved;
    uint64_t user_va;
    uint64_t length;
    uint64_t iova;
};

struct iommu_ioas_unmap {
    uint32_t size;
    uint32_t ioas_id;
    uint64_t iova;
    uint64_t length;
};

struct vfio_group_status {
    uint32_t argsz;
    uint32_t flags;
};

struct vfio_device_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t num_regions;
    uint32_t num_irqs;
    uint32_t cap_offset;
    uint32_t pad;
};

struct vfio_region_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t cap_offset;
    uint64_t size;
    uint64_t offset;
};

struct vfio_info_cap_header {
    uint16_t id;
    uint16_t version;
    uint32_t next;
};

struct vfio_region_sparse_mmap_area {
    uint64_t offset;
    uint64_t size;
};

struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header;
    uint32_t nr_areas;
    uint32_t reserved;
    /* struct vfio_region_sparse_mmap_area areas[nr_areas] follow */
};

struct vfio_irq_info {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t count;
};

struct vfio_irq_set {
    uint32_t argsz;
    uint32_t flags;
    uint32_t index;
    uint32_t start;
    uint32_t count;
    /* uint8_t data[]: count int32 eventfds (DATA_EVENTFD) or count uint8 (DATA_BOOL) */
};

struct vfio_iommu_type1_info {
    uint32_t argsz;
    uint32_t flags;
    uint64_t iova_pgsizes;
    uint32_t cap_offset;
    uint32_t pad;
};

struct vfio_iommu_type1_dma_map {
    uint32_t argsz;
    uint32_t flags;
    uint64_t vaddr;
    uint64_t iova;
    uint64_t size;
};

struct vfio_iommu_type1_dma_unmap {
    uint32_t argsz;
    uint32_t flags;
    uint64_t iova;
    uint64_t size;
};
