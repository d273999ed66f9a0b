/*
 * Umbrella header for the uvmbus native extension.  C sources include this;
 * native/build.py feeds the same files to cffi (wire layouts packed).
 */
#ifndef UVMBUS_H
#define UVMBUS_H

#include <stdint.h>
#include <stddef.h>

#pragma pack(push, 1)
#include "vmbus_wire.h"
#include "netvsc_wire.h"
#include "storvsc_wire.h"
#include "vfio_wire.h"
#include "nvme_wire.h"
#include "ic_wire.h"
#include "trace_wire.h"
#pragma pack(pop)

#include "trace.h"
#include "ring.h"
#include "dma.h"
#include "host.h"
#include "netvsc.h"
#include "netvsp.h"
#include "storvsc.h"
#include "storvsp.h"
#include "nvme.h"

#endif
