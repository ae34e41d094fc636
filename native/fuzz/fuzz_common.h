/*
 * Shared libFuzzer harness for libvdsk: each fuzz_<fmt>.c target is one
 * LLVMFuzzerTestOneInput() calling fuzz_image() with its format.
 */
#ifndef VDSK_FUZZ_COMMON_H
#define VDSK_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/*
 * Write the input to a private image file and run it through the public
 * API: open (format forced to fmt unless NULL, and probed), info, reads of
 * the virtual disk (bounded), block status, snapshot list, the backing
 * chain when the backing file is the harness's own, check, and check with
 * leak repair on the private copy.  API contract violations (a failure
 * without an error code, a block status run out of range, ...) abort().
 */
void fuzz_image(const uint8_t *data, size_t size, const char *fmt);

#endif
