"""netvsc: the synthetic NIC driver (NVSP + RNDIS over uio_hv_generic).

    import uvmbus.netvsc
    with uvmbus.netvsc.open("netvsc", root="/", queues=2) as nic:
        burst = nic.rx_burst(queue=0, max_frames=256, timeout=1.0)
        nic.tx_burst(burst, queue=0)            # forward what came in
        print(nic.mac, nic.mtu, nic.link_up, nic.stats())

See docs/netvsc.md for the API, its limits and the threads/processes model.
"""

from uvmbus.netvsc.burst import FrameMeta, RxBurst, TxBatch, csum_request
from uvmbus.netvsc.nic import DEFAULT_TIMEOUT, Nic, NicInfo, Queue, QueueSpec, attach_queue, open

__all__ = ["DEFAULT_TIMEOUT", "FrameMeta", "Nic", "NicInfo", "Queue", "QueueSpec", "RxBurst", "TxBatch",
           "attach_queue", "csum_request", "open"]
