/*
 * One libFuzzer target per format: the Makefile builds this file once per
 * format with -DVDSK_FUZZ_FORMAT='"qcow2"' (etc.), or NULL for the target
 * that only probes (auto-detection, raw fallback).
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"

#ifndef VDSK_FUZZ_FORMAT
#error "build with -DVDSK_FUZZ_FORMAT=<format string or NULL>"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_image(data, size, VDSK_FUZZ_FORMAT);
	return 0;
}
