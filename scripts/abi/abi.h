/*
 * Test tooling (not part of the product): helpers for the programs in scripts/abi/, each of
 * which prints, as one JSON object, the values an ffi/ module of fastloop must hold according to
 * the kernel UAPI headers installed on this machine (or given with -I).
 *
 * Output: {"module":"ffi/x.ts","header":"...","values":{"TS_NAME":"decimal",...},
 *          "notInHeader":["TS_NAME",...]}
 * Values are decimal strings so that 64-bit constants survive JSON. Keys are the names the ffi
 * module exports; test/host/abi.test.ts imports the module and compares by name.
 */
#ifndef FASTLOOP_ABI_H
#define FASTLOOP_ABI_H

#include <stddef.h>
#include <stdio.h>

static int abi_first_value = 1;
static int abi_first_missing = 1;
static char abi_missing[16384];
static size_t abi_missing_len = 0;

static inline void abi_begin(const char *module, const char *header)
{
	printf("{\"module\":\"%s\",\"header\":\"%s\",\"values\":{", module, header);
}

static inline void abi_unsigned(const char *name, unsigned long long value)
{
	printf("%s\n\"%s\":\"%llu\"", abi_first_value ? "" : ",", name, value);
	abi_first_value = 0;
}

static inline void abi_signed(const char *name, long long value)
{
	printf("%s\n\"%s\":\"%lld\"", abi_first_value ? "" : ",", name, value);
	abi_first_value = 0;
}

/* A name the ffi module defines that this header does not have (a newer kernel's). */
static inline void abi_missing_name(const char *name)
{
	int n = snprintf(abi_missing + abi_missing_len, sizeof(abi_missing) - abi_missing_len,
			 "%s\"%s\"", abi_first_missing ? "" : ",", name);
	if (n > 0 && (size_t)n < sizeof(abi_missing) - abi_missing_len)
		abi_missing_len += (size_t)n;
	abi_first_missing = 0;
}

static inline int abi_end(void)
{
	printf("},\n\"notInHeader\":[%s]}\n", abi_missing);
	return 0;
}

/* A constant exported under its C name. */
#define CONST(c) abi_unsigned(#c, (unsigned long long)(c))
/* A constant that may be negative. */
#define SCONST(c) abi_signed(#c, (long long)(c))
/* Any value under a TS name: offsets, sizes, renamed constants. */
#define VALUE(ts, v) abi_unsigned(ts, (unsigned long long)(v))
#define SVALUE(ts, v) abi_signed(ts, (long long)(v))
#define OFFSET(ts, type, member) VALUE(ts, offsetof(type, member))
#define SIZE(ts, type) VALUE(ts, sizeof(type))
#define MISSING(ts) abi_missing_name(ts)

#endif
