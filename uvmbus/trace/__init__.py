"""Trace layer: record VMBus sessions to pcapng, decode, diff and replay them.

See docs/trace.md.  Recording lives in C (native/trace.c, hooked into the ring commits);
this package writes the file headers, flushes, decodes with the drivers' own wire
layouts (native/*_wire.h through cffi) and ships the Wireshark dissector.
"""

from uvmbus.trace.recorder import DEFAULT_SNAPLEN, Port, Recorder, as_recorder, device_class_code

__all__ = ["DEFAULT_SNAPLEN", "Port", "Recorder", "as_recorder", "device_class_code"]
