/* cpu/kernels-avx2.c — placeholder while the AVX2 table is written. */
#include "kernels.h"
const struct moqae_cpu_kernels * moqae_cpu_kernels_avx2(void) {
    return NULL;
}
