/* What Python asks the library about itself: the ISA it was built for, its thread count, and the
 * sizes of the structs it shares with ctypes (checked at load). */
#include <omp.h>

#include "common.h"

const char *kv_isa(void) { return KV_ISA_NAME; }

void kv_set_threads(int n) { omp_set_num_threads(n); }

/* sizeof kv_qlinear_t, kv_layer_t, kv_model_t */
void kv_struct_sizes(int64_t *out) {
    out[0] = (int64_t)sizeof(kv_qlinear_t);
    out[1] = (int64_t)sizeof(kv_layer_t);
    out[2] = (int64_t)sizeof(kv_model_t);
}
