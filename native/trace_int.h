/* Recorder entry used by the ring commits (not part of the cffi API). */
#ifndef UVB_TRACE_INT_H
#define UVB_TRACE_INT_H
void uvb_rec_ring_packet(struct uvb_rec_port *p, uint32_t dir, uint64_t ts,
                         const uint8_t *a, uint32_t alen, const uint8_t *b, uint32_t blen);
#endif
