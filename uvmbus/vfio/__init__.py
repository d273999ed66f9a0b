"""vfio: PCI functions from userspace through Linux VFIO (beside :mod:`uvmbus.uio`).

- :mod:`~uvmbus.vfio.pci`: discovery (:class:`PciBus`, :class:`PciFunction`: ids, class,
  IOMMU group, driver, Hyper-V vPCI parent);
- :mod:`~uvmbus.vfio.binding`: :func:`bind_vfio` / :func:`unbind_vfio`;
- :mod:`~uvmbus.vfio.device`: the container/group/device API (type1 and no-IOMMU), regions,
  interrupts, reset;
- :mod:`~uvmbus.vfio.dma`: DMA memory providers (IOMMU-mapped, or physical hugepages).

See docs/vfio.md.
"""

from uvmbus.vfio.binding import bind_vfio, unbind_vfio
from uvmbus.vfio.device import Container, Device, Group, SysOps, VfioHandle, open_device
from uvmbus.vfio.dma import IommuDmaMemory, dma_memory_for
from uvmbus.vfio.pci import VFIO_DRIVER, PciBus, PciFunction, guid_domain, normalize_bdf

__all__ = ["VFIO_DRIVER", "Container", "Device", "Group", "IommuDmaMemory", "PciBus",
           "PciFunction", "SysOps", "VfioHandle", "bind_vfio", "dma_memory_for", "guid_domain",
           "normalize_bdf", "open_device", "unbind_vfio"]
